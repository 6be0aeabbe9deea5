"""dvc.yaml lists, for every stage, exactly the components/ modules the stage's code imports.

DVC re-runs a stage only when a listed dependency changes. A module left out (say params.py, whose
defaults fill keys that params.yaml lacks) could change what a stage produces without re-running
it, and the model's lineage would then name code that did not build it. A module listed that the
stage does not import re-runs it for nothing (a plot title retraining the model). The same holds for
the Jinja2 templates its code renders (components/templates.py): they are listed too.
"""

from __future__ import annotations

import ast

import pytest
import yaml

from components.cli import COMMANDS
from tests.import_graph import ROOT, closure, module_file

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def stage_code(stage: str) -> set[str]:
    """The files of the stage's command module and of everything it imports (package __init__s, empty, aside)."""
    cmd = STAGES[stage]["cmd"]
    assert cmd.startswith("medtune "), f"stage {stage}: expected a `medtune <stage>` command, got {cmd!r}"
    files = {module_file(m) for m in closure(COMMANDS[cmd.split()[1]][0])}
    return {f.relative_to(ROOT).as_posix() for f in files if f.name != "__init__.py"}


def stage_templates(stage: str) -> set[str]:
    """The template files the stage's code renders: each string constant ending in `.j2` in its modules,
    a name under components/ (components.templates.render's names) or under the module's own templates/."""
    found = set()
    for path in (ROOT / f for f in stage_code(stage)):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".j2"):
                where = [
                    p for p in (ROOT / "components" / node.value, path.parent / "templates" / node.value) if p.is_file()
                ]
                assert where, f"{path.relative_to(ROOT)} names template {node.value!r}, which is not a file"
                found.add(where[0].relative_to(ROOT).as_posix())
    return found


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_depends_on_exactly_the_modules_its_code_imports(stage):
    listed = {d for d in STAGES[stage]["deps"] if isinstance(d, str) and d.startswith("components/")}
    needed = stage_code(stage) | stage_templates(stage)
    assert not needed - listed, f"dvc.yaml stage {stage} misses code it imports: {sorted(needed - listed)}"
    assert not listed - needed, f"dvc.yaml stage {stage} lists code it does not import: {sorted(listed - needed)}"


def test_closure_follows_imports_inside_functions():
    # export imports models and preprocess only inside functions; they must still count.
    assert {
        "components/model/models.py",
        "components/data/preprocess.py",
        "components/data/scans.py",
        "components/params.py",
        "components/common.py",
    } <= stage_code("export")


def test_a_rendered_template_counts_as_code():
    assert "components/data/templates/validation.md.j2" in stage_templates("validate")
