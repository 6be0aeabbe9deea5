"""The folders of components/ import one way: each lifecycle step uses the steps before it, never after.

    flows/                        Prefect wiring (the commands, the flows)
    components/cli.py             the `medtune` command: imports every command's module when it runs
    components/audit/  retrain/   audit reads what release wrote; retrain runs the pipeline again;
    components/tune/              tune searches model parameters, each trial a DVC experiment
    components/release/           export, ONNX Runtime, predict, the registry and its records
    components/model/             backbones, training, calibration, metrics, evaluation
    components/data/              scans, manifest, ingest, validate, preprocess, augment
    components/*.py               params, common and the other shared helpers

A module may import its own folder and any folder below it. audit/, retrain/ and tune/ sit side by
side and never import each other. Nothing in components/ imports flows/, and no import cycle exists anywhere.
"""

from __future__ import annotations

import pytest

from tests.import_graph import all_modules, imports

# Folder -> rank; an import may only point to the same or a lower rank.
RANKS = {"shared": 0, "data": 1, "model": 2, "release": 3, "audit": 4, "retrain": 4, "tune": 4, "cli": 5, "flows": 6}


def folder(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "flows":
        return "flows"
    if parts[1:] == ["cli"]:
        return "cli"
    return parts[1] if len(parts) > 2 else "shared"  # components.data.ingest -> data; components.params -> shared


@pytest.mark.parametrize("module", all_modules())
def test_imports_point_down(module):
    mine = folder(module)
    for dep in imports(module):
        theirs = folder(dep)
        assert RANKS[theirs] < RANKS[mine] or theirs == mine, (
            f"{module} ({mine}/) imports {dep} ({theirs}/): imports must point down (tests/test_architecture.py)"
        )


def test_no_import_cycles():
    graph = {m: set(imports(m)) for m in all_modules()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(graph[m]):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(path[path.index(dep) :] + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_every_folder_is_ranked():
    assert {folder(m) for m in all_modules()} <= set(RANKS)


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    # The graph is read from the source: an upward import written into a copy is caught.
    from tests import import_graph

    fake = tmp_path / "components" / "data"
    fake.mkdir(parents=True)
    (tmp_path / "components" / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "bad.py").write_text("def f():\n    from components.release import registry\n")
    (tmp_path / "components" / "release").mkdir()
    (tmp_path / "components" / "release" / "registry.py").write_text("")
    monkeypatch.setattr(import_graph, "ROOT", tmp_path)
    import_graph.imports.cache_clear()
    try:
        with pytest.raises(AssertionError, match="imports must point down"):
            test_imports_point_down("components.data.bad")
    finally:
        import_graph.imports.cache_clear()
