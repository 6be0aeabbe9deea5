"""Every third-party package components/ and flows/ import is declared in pyproject.toml.

A package that arrives only as some other package's dependency can disappear with that package's next
release; the lock file would hide it until someone re-locks.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions

from tests.import_graph import PACKAGES, ROOT, all_modules, module_file


def third_party_imports() -> dict[str, set[str]]:
    """top-level import name -> modules importing it (stdlib and the project's own left out)."""
    found: dict[str, set[str]] = {}
    for module in all_modules():
        for node in ast.walk(ast.parse(module_file(module).read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                else []
            )
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in PACKAGES:
                    found.setdefault(top, set()).add(module)
    return found


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {re.split(r"[<>=!~\[ ;]", spec, maxsplit=1)[0].lower().replace("_", "-") for spec in project["dependencies"]}


def test_every_imported_package_is_declared():
    dists = packages_distributions()
    have = declared()
    missing = {}
    for name, users in third_party_imports().items():
        owners = {d.lower().replace("_", "-") for d in dists.get(name, [name])}
        if not owners & have:
            missing[name] = (sorted(owners), sorted(users))
    assert not missing, (
        f"imported but not in pyproject.toml's dependencies (package: (distributions, importers)): {missing}"
    )


def test_the_check_sees_a_real_import():
    assert "torch" in third_party_imports() and "torch" in declared()
