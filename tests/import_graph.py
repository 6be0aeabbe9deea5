"""The import graph of components/ and flows/, read from the source (ast), not by importing it.

Imports inside functions count too: a module imported lazily still runs when its caller does, so it
still changes what a stage produces (tests/test_dvc_yaml.py) and still ties two folders together
(tests/test_architecture.py).
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("components", "flows")


def module_file(name: str) -> Path | None:
    """components.data.ingest -> components/data/ingest.py (a package -> its __init__.py); None if neither."""
    base = ROOT.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return base / "__init__.py" if (base / "__init__.py").is_file() else None


def module_name(path: Path) -> str:
    parts = path.resolve().relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> list[str]:
    return sorted(module_name(p) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


@cache
def imports(module: str) -> frozenset[str]:
    """The project modules `module` imports (`from a.b import c` counts as a.b.c when c is a module)."""
    path = module_file(module)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in PACKAGES:
            # `from a.b import c`: the module a.b.c when there is one, else a name defined in a.b
            found |= {
                f"{node.module}.{alias.name}" if module_file(f"{node.module}.{alias.name}") else node.module
                for alias in node.names
            }
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
    return frozenset(m for m in found if module_file(m) and m != module)


def closure(module: str) -> set[str]:
    """`module` and every project module it imports, directly or not."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += imports(name)
    return seen
