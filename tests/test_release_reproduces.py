"""Every release reproduces: a fresh clone checked out at a promotion tag, after `dvc pull`, has a clean
`dvc status`, `dvc repro` has nothing to do and `medtune verify` passes; and the lineage's `git_dirty`
says whether the *code* was modified, not the data version, dvc.lock or params.yaml a run writes.

The promotion is the retrain flow's, on the shared trained workspace
(conftest's `killed_after_push`): params.yaml was changed and not committed before
the run, which trained and exported with it and was killed right after the promotion's `dvc push`.
`promote.recover()`, the first task of every retrain run, then records the release with the same code
an uninterrupted run uses (`promote._complete`: push, registry copy, one commit, tag).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components import common
from tests import workspace
from tests.workspace import ROOT, UNCOMMITTED_PARAMS, copy_of, onnx_model_id, tool_env

pytestmark = pytest.mark.slow

RECOVER = "import json; from components.retrain import promote; print(json.dumps(promote.recover('.')))"


def run(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    return workspace.run(cmd, cwd, env, check, timeout=600)


def env_for() -> dict:
    env = tool_env(PYTHONPATH=str(ROOT))  # `medtune` and `python -c` import the code under test
    env.pop("MEDTUNE_PATIENT_SALT", None)  # the shared workspace was built with the (allowed) public salt
    return env


@pytest.fixture(scope="module")
def released(killed_after_push, module_tmp):
    """The shared workspace's promotion, finished: committed and tagged, its data in the local remote."""
    tmp = module_tmp
    ws, env = copy_of(killed_after_push["ws"], tmp), env_for()
    done = json.loads(run([sys.executable, "-c", RECOVER], ws, env).stdout.splitlines()[-1])
    assert any("finishing the interrupted promoted release" in d for d in done), done
    current = json.loads((ws / "registry/current.json").read_text())
    return {"ws": ws, "tmp": tmp, "env": env, "tag": current["git_tag"], "model_id": current["model_id"]}


def test_a_fresh_clone_at_the_promotion_tag_reproduces_the_model(released):
    ws, tmp, env, tag = released["ws"], released["tmp"], released["env"], released["tag"]
    committed = run(["git", "show", "--name-only", "--format=", f"{tag}^{{commit}}"], ws, env).stdout.split()
    for f in (
        "params.yaml",
        "dvc.lock",
        "data/raw.dvc",
        ".dvc/config",
        "registry/current.json",
        "registry/releases.jsonl",
        f"registry/models/{released['model_id']}/lineage.json",
    ):
        assert f in committed, (f, committed)

    clone = tmp / "clone"  # beside the workspace, so the local remote's relative URL resolves alike
    run(["git", "clone", "-q", str(ws), str(clone)], tmp, env)
    run(["git", "checkout", "-q", tag], clone, env)
    # The parameters at the tag are the ones the model was trained with (changed, uncommitted, before the run).
    params = yaml.safe_load((clone / "params.yaml").read_text())
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    want = UNCOMMITTED_PARAMS["train"]["batch_size"]
    assert (
        params["train"]["batch_size"] == lock["stages"]["train"]["params"]["params.yaml"]["train"]["batch_size"] == want
    )

    run(["dvc", "pull"], clone, env)
    status = run(["dvc", "status"], clone, env).stdout
    assert "Data and pipelines are up to date" in status, status
    lock_bytes = (clone / "dvc.lock").read_bytes()
    repro = run(["dvc", "repro"], clone, env)
    assert "Running stage" not in repro.stdout + repro.stderr, repro.stdout + repro.stderr
    assert "Data and pipelines are up to date" in repro.stdout, repro.stdout
    assert (clone / "dvc.lock").read_bytes() == lock_bytes
    assert run(["git", "status", "--porcelain"], clone, env).stdout == ""

    verify = run(["medtune", "verify", "current", "--json"], clone, env, check=False)
    rep = json.loads(verify.stdout)
    assert verify.returncode == 0 and rep["ok"], [i for i in rep["items"] if i["status"] != "ok"]
    scans = [i for i in rep["items"] if i["kind"] == "scan"]
    assert scans and all(i["source"].startswith("workspace") for i in scans)
    assert rep["model_id"] == released["model_id"] == onnx_model_id(clone / "models/model.onnx")


def test_the_lineage_says_the_code_was_clean_though_params_and_data_changed(released):
    ws, env, tag = released["ws"], released["env"], released["tag"]
    lineage = json.loads((ws / f"registry/models/{released['model_id']}/lineage.json").read_text())
    code = lineage["code"]
    # Exported while params.yaml, data/raw.dvc and dvc.lock differed from HEAD: none of them is code.
    assert code["git_dirty"] is False
    assert code["git_commit"] == run(["git", "rev-parse", f"{tag}^{{commit}}^"], ws, env).stdout.strip()
    before = yaml.safe_load(run(["git", "show", f"{code['git_commit']}:params.yaml"], ws, env).stdout)
    assert (
        before["train"]["batch_size"]
        != code["params"]["train"]["batch_size"]
        == UNCOMMITTED_PARAMS["train"]["batch_size"]
    )
    import onnx

    # The commit is a fact of the export run, not of the model: only the (uncached) lineage holds it.
    meta = {p.key: p.value for p in onnx.load(str(ws / "models/model.onnx")).metadata_props}
    assert meta["model_id"] == released["model_id"] and not {"git_commit", "git_dirty"} & set(meta)


def test_no_patient_identifier_reaches_the_release(released):
    ws, env, tag = released["ws"], released["env"], released["tag"]
    # The demo's DICOM headers carry PatientID DEMO-<n> and PatientName Demo^Patient<n> (components/data/demo_data.py,
    # the code that writes them, is the one file allowed to name the pattern). Binary files included (-a).
    found = run(
        [
            "git",
            "grep",
            "-a",
            "-l",
            "-e",
            "DEMO-",
            "-e",
            "Demo^Patient",
            tag,
            "--",
            ".",
            ":(exclude)components/data/demo_data.py",
        ],
        ws,
        env,
        check=False,
    )
    assert found.returncode == 1 and found.stdout == "", found.stdout
    messages = run(["git", "log", "--all", "--format=%B"], ws, env).stdout
    assert "DEMO-" not in messages and "Demo^Patient" not in messages


def test_git_facts_counts_code_only(tmp_path):
    """Records a run writes (dvc.lock, params.yaml, .dvc files, .gitignores, outputs, .dvc/config, the
    registry) leave the code clean; a changed tracked file, or a stage dependency git does not hold, do not."""
    env = tool_env()
    ws = tmp_path / "ws"
    (ws / "src").mkdir(parents=True)
    (ws / "src/stage.py").write_text("print('stage')\n")
    (ws / "README.md").write_text("notes\n")
    (ws / "params.yaml").write_text("train: {epochs: 1}\n")
    (ws / "dvc.yaml").write_text(
        "stages:\n  s:\n    cmd: python src/stage.py\n    deps: [src/stage.py, src/helper.py, data/raw]\n"
        "    params: [train]\n    outs:\n      - reports/out.json:\n          cache: false\n"
        "      - data/prepared\n"
    )
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        run(cmd, ws, env)
    (ws / "data/raw").mkdir(parents=True)
    (ws / "data/raw/a.txt").write_text("scan")
    run(["dvc", "add", "-q", "data/raw"], ws, env)
    (ws / "reports").mkdir()
    (ws / "reports/out.json").write_text("{}")
    (ws / "registry").mkdir()
    (ws / "registry/releases.jsonl").write_text("")
    (ws / "dvc.lock").write_text("schema: '2.0'\n")
    run(["git", "add", "-A"], ws, env)
    run(["git", "commit", "-qm", "init"], ws, env)
    head = run(["git", "rev-parse", "HEAD"], ws, env).stdout.strip()

    def facts() -> tuple:
        f = common.git_facts(ws)
        assert f["commit"] == head
        return f["dirty"], f.get("modified") or []

    assert facts() == (False, [])

    (ws / "params.yaml").write_text("train: {epochs: 8}\n")
    (ws / "data/raw/b.txt").write_text("new scan")
    run(["dvc", "add", "-q", "data/raw"], ws, env)  # the data version and data/.gitignore change
    (ws / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (ws / "reports/out.json").write_text('{"auroc": 1}')
    (ws / "registry/releases.jsonl").write_text('{"event": "promoted"}\n')
    run(["dvc", "remote", "add", "-d", "store", str(tmp_path / "remote")], ws, env)
    (ws / "notes.txt").write_text("untracked, and no stage depends on it\n")
    assert facts() == (False, [])

    (ws / "src/helper.py").write_text("x = 1\n")  # a stage dependency that a checkout would not have
    assert facts() == (True, ["src/helper.py"])
    (ws / "src/helper.py").unlink()
    (ws / "README.md").write_text("edited\n")
    assert facts() == (True, ["README.md"])
    assert common.git_facts(tmp_path)["dirty"] is None  # outside git: unknown
