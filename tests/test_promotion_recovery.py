"""A retrain run killed in the middle of its promotion, and the public patient salt, end to end.

Real Prefect server (one per module, its own PREFECT_HOME), real `medtune retrain --once`, git, DVC
with a local remote, tiny synthetic DICOMs. A run is killed at an exact step by a wrapper script
that replaces `components.retrain.promote.git` / `.dvc` with a version that calls `os._exit(137)` right after
the targeted command (production code unchanged).

One trained workspace serves every kill point: its retrain run (allowed a public salt by
`retrain.allow_public_salt`, since the demo's patient ids are made up; params.yaml changed and not
committed before it, as a user tuning a parameter does) is killed right after `dvc push`, the first
step of the promotion. Each test copies it; for the later kill points the copy's next run (which
resumes the promotion) is killed again after `git commit` or `git tag`. Then one plain
`retrain --once` must finish the promotion without retraining or re-exporting, and commit the
changed params.yaml with it. The Prefect server (`salt_free_server`) and the killed workspace (`killed_after_push`,
built once per test process) are fixtures of tests/conftest.py, their steps in tests/workspace.py; the
same workspace is what tests/test_release_reproduces.py and tests/test_remote_s3.py release and clone.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests import workspace
from tests.workspace import (
    RETRAIN_TIMEOUT,
    copy_of,
    drop_batch,
    make_retrain_project,
    onnx_model_id,
    retrain,
    tree_digest,
)

pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    return workspace.run(cmd, cwd, env, check, timeout=RETRAIN_TIMEOUT)


def result(out: subprocess.CompletedProcess) -> dict:
    """The flow's result, which `medtune retrain --once` prints last as JSON."""
    lines = out.stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


def test_public_salt_refuses_the_run_before_anything_is_appended(salt_free_server, tmp_path):
    env = salt_free_server["env"]
    ws = tmp_path / "ws"
    make_retrain_project(ws, env, allow_public_salt=False)
    drop_batch(ws, env)
    head = run(["git", "rev-parse", "HEAD"], ws, env).stdout
    raw, batch = tree_digest(ws / "data/raw"), tree_digest(ws / "data/inbox")

    out = retrain(ws, env, check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    error = out.stderr[out.stderr.rfind("error: ") :]
    assert "public salt (params.yaml default)" in error and "MEDTUNE_PATIENT_SALT" in error, error
    assert "batch-2024-06" in error and "retrain.allow_public_salt" in error and "Nothing was appended" in error
    assert "PUBLIC salt" in out.stderr  # the batch check's warning
    # Nothing happened: same commit, raw data and inbox; nothing quarantined, pushed or trained.
    assert run(["git", "rev-parse", "HEAD"], ws, env).stdout == head
    assert tree_digest(ws / "data/raw") == raw and tree_digest(ws / "data/inbox") == batch
    assert not (ws / "data/quarantine").exists() and not (ws / "models").exists()
    assert not (tmp_path / "dvc-remote").exists()
    assert run(["git", "status", "--porcelain"], ws, env).stdout == ""


def test_public_salt_allowed_by_the_flag_is_warned_and_recorded(killed_after_push, salt_free_server):
    ws, out, env = killed_after_push["ws"], killed_after_push["out"], salt_free_server["env"]
    assert "KILLED after dvc push" in out.stderr  # the flag let the run train, export and start promoting
    assert out.stderr.count("hashed with a PUBLIC salt (params.yaml default)") >= 2, out.stderr[-4000:]  # batch, ingest
    expected = {"status": "public", "source": "params.yaml default", "real_patient_ids": True}
    assert json.loads((ws / "data/manifest.json").read_text())["patient_salt"] == expected
    assert json.loads((ws / "models/lineage.json").read_text())["data"]["patient_salt"] == expected
    text = run(["medtune", "trace", "models/model.onnx"], ws, env).stdout
    data = text[text.index("3. Data version") : text.index("4. ")]
    assert "patient_salt: status=public, source=params.yaml default, real_patient_ids=True" in data, data
    assert "WARNING: real patient ids were hashed with a public salt" in data
    traced = json.loads(run(["medtune", "trace", "models/model.onnx", "--json"], ws, env).stdout)
    assert traced["data"]["patient_salt"] == expected


@pytest.mark.parametrize("kill_after", ["dvc push", "git commit", "git tag -a"])
def test_a_promotion_killed_at_any_step_is_finished_by_the_next_run(
    killed_after_push, salt_free_server, tmp_path, kill_after
):
    env = salt_free_server["env"]
    ws = copy_of(killed_after_push["ws"], tmp_path)
    onnx = ws / "models/model.onnx"
    exported = (onnx.read_bytes(), onnx.stat().st_mtime_ns, (ws / "models/model.pt").stat().st_mtime_ns)
    if kill_after != "dvc push":  # the next run resumes the promotion; kill it at a later step
        out = retrain(ws, env, kill_after=kill_after)
        assert f"KILLED after {kill_after}" in out.stderr and "medtune-pipeline" not in out.stderr, out.stderr[-4000:]
    assert list((ws / "data/inbox").iterdir()), "the batch is archived only when the promotion is complete"

    out = retrain(ws, env)
    assert result(out)["outcome"] == "recovered", out.stdout
    assert "finishing the interrupted promoted release" in out.stderr and "medtune-pipeline" not in out.stderr

    # Nothing was trained or exported again: the exported model is the promoted one.
    assert (onnx.read_bytes(), onnx.stat().st_mtime_ns, (ws / "models/model.pt").stat().st_mtime_ns) == exported
    lineage = json.loads((ws / "models/lineage.json").read_text())
    current = json.loads((ws / "registry/current.json").read_text())
    assert current["model_id"] == lineage["model_id"] == onnx_model_id(onnx)
    stored = json.loads((ws / f"registry/models/{current['model_id']}/lineage.json").read_text())
    assert stored["onnx_sha256"] == lineage["onnx_sha256"]
    events = [json.loads(x) for x in (ws / "registry/releases.jsonl").read_text().splitlines()]
    assert [(e["event"], e["model_id"]) for e in events] == [("promoted", current["model_id"])]
    tagged = run(["git", "rev-list", "-n", "1", current["git_tag"]], ws, env).stdout.strip()
    assert tagged == run(["git", "log", "-1", "--format=%H", "--", "registry/current.json"], ws, env).stdout.strip()

    # The parameters the model was trained with were committed with it (changed, uncommitted, before the run).
    tag = current["git_tag"]
    at_tag = yaml.safe_load(run(["git", "show", f"{tag}:params.yaml"], ws, env).stdout)
    lock = yaml.safe_load(run(["git", "show", f"{tag}:dvc.lock"], ws, env).stdout)
    assert at_tag["train"]["batch_size"] == lock["stages"]["train"]["params"]["params.yaml"]["train"]["batch_size"] == 8
    assert lineage["code"]["params"]["train"]["batch_size"] == 8

    # The promotion is complete and consistent: batch archived, verify passes, git and DVC clean.
    assert not list((ws / "data/inbox").iterdir()) and list((ws / "data/inbox-processed").iterdir())
    assert not (ws / ".dvc/tmp/medtune-release.json").exists()
    verify = run(["medtune", "verify", "current"], ws, env, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert run(["git", "status", "--porcelain"], ws, env).stdout == ""
    assert "up to date" in run(["dvc", "status"], ws, env).stdout
    assert result(retrain(ws, env))["outcome"] == "nothing-new"  # and the next run has nothing to do
