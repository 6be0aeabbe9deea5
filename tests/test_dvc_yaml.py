"""dvc.yaml lists, for every stage, each components/ module the stage's code imports.

DVC re-runs a stage only when a listed dependency changes. A module left out (say params.py, whose
defaults fill keys that params.yaml lacks) could change what a stage produces without re-running
it, and the model's lineage would then name code that did not build it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def imported_modules(path: Path) -> set[str]:
    """components/ modules imported anywhere in a file (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module == "components":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("components."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("components.")}
    return found


def closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += imported_modules(ROOT / "components" / f"{name}.py")
    return seen


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_depends_on_every_module_its_code_imports(stage):
    cmd = STAGES[stage]["cmd"]
    assert cmd.startswith("medtune "), f"stage {stage}: expected a `medtune <stage>` command, got {cmd!r}"
    listed = {d for d in STAGES[stage]["deps"] if isinstance(d, str) and d.startswith("components/")}
    needed = {f"components/{m}.py" for m in closure(cmd.split()[1])}
    assert not needed - listed, f"dvc.yaml stage {stage} misses code it imports: {sorted(needed - listed)}"


def test_closure_follows_imports_inside_functions():
    # export imports models and preprocess only inside functions; they must still count.
    assert {"models", "preprocess", "scans", "params", "common"} <= closure("export")
