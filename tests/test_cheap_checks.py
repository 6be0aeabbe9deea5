"""Commands that must stay cheap, checked by what their process imported.

`medtune retrain --once` answers an empty inbox before Prefect, a server, the lock, git or DVC.
`medtune trace` and `verify` (like `predict`, tests/test_predict.py) import nothing of the training
stack, which the slim predict image (Dockerfile target predict) does not hold.

The whole process runs as a user runs it (the `medtune` console script), under `-X importtime`,
so the modules it imported are read from its own report: an empty inbox imports neither Prefect,
torch nor DVC, and leaves no PREFECT_HOME behind; a batch in the inbox still reaches the flow.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from components.retrain import inbox, inbox_listing
from components.retrain.promote import PENDING
from flows import commands
from tests.workspace import BIN, ROOT, free_port, tool_env

pytestmark = pytest.mark.slow

HEAVY = ("prefect", "torch", "dvc")
# What `medtune train` and the pipeline need and the slim predict image leaves out.
TRAINING_STACK = ("torch", "torchvision", "pandas", "sklearn", "scipy", "prefect", "great_expectations", "matplotlib")


def project(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / "data" / "inbox").mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", ws)
    return ws


def retrain_once(ws: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """`medtune retrain --once` in `ws`; returns the process and the top-level packages it imported."""
    env = {k: v for k, v in tool_env(**env).items() if k != "PREFECT_API_URL" or "PREFECT_API_URL" in env}
    env.setdefault("PREFECT_HOME", str(ws.parent / "prefect-home"))
    out = subprocess.run(
        [sys.executable, "-X", "importtime", str(BIN / "medtune"), "retrain", "--once", *args],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return out, top_level_imports(out)


def top_level_imports(out: subprocess.CompletedProcess) -> set[str]:
    """The top-level modules a `-X importtime` process imported; its stderr keeps the other lines."""
    imported = {m.group(1).split(".")[0] for m in re.finditer(r"^import time:.*\|\s*(\S+)\s*$", out.stderr, re.M)}
    out.stderr = "\n".join(line for line in out.stderr.splitlines() if not line.startswith("import time:"))
    return imported


def test_empty_inbox_is_answered_without_prefect_torch_or_dvc(tmp_path):
    ws = project(tmp_path)
    # Not batches: a copy in progress (dot-name), a parked folder, a stray file.
    (ws / "data/inbox/.incoming-2024-07").mkdir()
    (ws / "data/inbox/_parked").mkdir()
    (ws / "data/inbox/notes.txt").write_text("not a batch")
    out, imported = retrain_once(ws)
    assert out.returncode == 0, out.stderr
    assert "inbox data/inbox: no new batches; nothing to do" in out.stderr
    assert json.loads(out.stdout) == {"outcome": "nothing-new", "trigger": "manual"}
    assert "components" in imported  # the probe works: it sees what the process imported
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    assert not (tmp_path / "prefect-home").exists()  # no Prefect settings, database or server was made


def test_a_missing_inbox_folder_is_an_empty_inbox(tmp_path):
    ws = project(tmp_path)
    shutil.rmtree(ws / "data/inbox")
    out, imported = retrain_once(ws)
    assert out.returncode == 0 and "no new batches" in out.stderr, out.stderr
    assert not imported & set(HEAVY)


def test_a_batch_in_the_inbox_still_runs_the_flow(tmp_path):
    """With a batch the flow starts: Prefect is imported and tries its API (here one that does not
    answer, so the run fails at once, before anything is read or changed)."""
    ws = project(tmp_path)
    (ws / "data/inbox/2024-06/normal").mkdir(parents=True)
    out, imported = retrain_once(ws, PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api")
    assert "prefect" in imported
    assert out.returncode != 0 and "nothing to do" not in out.stderr + out.stdout
    assert (ws / "data/inbox/2024-06/normal").is_dir()  # untouched


def test_params_errors_are_reported_before_the_inbox_is_looked_at(tmp_path):
    ws = project(tmp_path)
    shutil.copy(ws / "params.yaml", ws / "other.yaml")
    out, imported = retrain_once(ws, "--params", "other.yaml")
    assert out.returncode == 1 and "params=other.yaml" in out.stderr and "expected params.yaml" in out.stderr
    assert not imported & set(HEAVY)

    text = (ws / "params.yaml").read_text()
    assert "  val_fraction: 0.2\n" in text
    (ws / "params.yaml").write_text(text.replace("  val_fraction: 0.2\n", "  val_fraction: 2.0\n"))
    out, _ = retrain_once(ws)
    assert out.returncode == 1, out.stderr
    assert f"{ws / 'params.yaml'}" in out.stderr and "split.val_fraction = 2.0 is invalid" in out.stderr
    assert "nothing to do" not in out.stderr


@pytest.mark.parametrize("what", ["batch", "pending-release"])
def test_work_to_do_is_never_mistaken_for_an_empty_inbox(tmp_path, what, capsys):
    """The same listing as the flow (inbox.find_batches), and an interrupted release to finish
    (promote.PENDING) is work too: the flow's recovery runs it."""
    ws = project(tmp_path)
    assert commands._nothing_to_retrain(ws, "params.yaml") is True
    capsys.readouterr()
    if what == "batch":
        (ws / "data/inbox/2024-06").mkdir()
        assert inbox.find_batches is inbox_listing.find_batches  # one listing: the flow's is the CLI's
        assert [p.name for p in inbox.find_batches(ws / "data/inbox")] == ["2024-06"]
    else:
        (ws / PENDING).parent.mkdir(parents=True)
        (ws / PENDING).write_text(json.dumps({"record": {}}))
    assert commands._nothing_to_retrain(ws, "params.yaml") is False
    assert capsys.readouterr().out == ""  # said nothing: the flow speaks for itself


@pytest.mark.parametrize("command", ["trace", "verify"])
def test_trace_and_verify_import_nothing_of_the_training_stack(onnx_model, command):
    """On an exported model's project (not a DVC project: verify notes it and fails on the data
    version it cannot read). This venv holds the whole stack, so any import of it would show."""
    project = onnx_model.parent.parent
    out = subprocess.run(
        [sys.executable, "-X", "importtime", str(BIN / "medtune"), command, "models/model.onnx"],
        cwd=project,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    imported = top_level_imports(out)
    assert out.returncode == (0 if command == "trace" else 1), out.stderr[-3000:]
    assert out.stdout.startswith(f"medtune {command}: model ") and "Traceback" not in out.stderr
    assert {"components", "jinja2"} <= imported  # the probe sees the process's imports (the text report)
    assert ("dvc" in imported) == (command == "verify")  # verify asks DVC for the data version; trace never
    assert not imported & set(TRAINING_STACK), sorted(imported & set(TRAINING_STACK))
