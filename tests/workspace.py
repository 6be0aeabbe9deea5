"""Shared by the integration tests and the benchmarks: a tiny git + DVC medtune project.

from tests.workspace import make_workspace, run   # pytest and `python -m bench` run from the project root
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from components.params import GateParams

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Small enough for 2 CPU cores: 32 px, a random-init backbone, a couple of epochs, gates open.
TINY = {
    "split": {"seed": 1, "val_fraction": 0.25, "test_fraction": 0.3},
    "validate": {"min_images_per_class_split": 1},
    "preprocess": {"image_size": 32},
    "augment": {"preview_count": 4},
    "train": {"backbone": "none", "pretrained": False, "epochs": 2, "batch_size": 8, "lr": 0.003},
    "evaluate": {
        "bootstrap": 50,
        "gate": {"min_auroc": 0.0, "min_sensitivity": 0.0, "min_specificity": 0.0, "min_balanced_accuracy": 0.0},
    },
    "export": {"parity_batch": 4},
}


def tool_env(**extra: str) -> dict[str, str]:
    """The environment for medtune/dvc/git subprocesses: this venv first, no analytics, a git identity."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        **extra,
    }


def run(
    cmd: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True, timeout: float | None = None
) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env or tool_env(), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


def set_params(ws: Path, over: dict) -> None:
    """Merge `over` into the project's params.yaml, as a user editing it would."""
    p = ws / "params.yaml"
    p.write_text(yaml.safe_dump(merge(yaml.safe_load(p.read_text()), over), sort_keys=False))


def make_workspace(
    dst: Path, patients: int = 12, params: dict | None = None, env: dict[str, str] | None = None
) -> Path:
    """A fresh git+DVC project: dvc.yaml, the stage code it depends on, TINY params (plus `params`),
    synthetic demo scans versioned with `dvc add`."""
    dst.mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", dst)
    shutil.copytree(ROOT / "components", dst / "components", ignore=shutil.ignore_patterns("__pycache__"))
    tiny = merge(TINY, params or {})
    (dst / "params.yaml").write_text(yaml.safe_dump(merge(yaml.safe_load((ROOT / "params.yaml").read_text()), tiny)))
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["medtune", "demo-data", "--out", "data/raw", "--patients", str(patients), "--slices", "3", "--size", "32"],
        ["dvc", "add", "-q", "data/raw"],
    ):
        run(cmd, dst, env)
    return dst


def tree_digest(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes, to prove a folder unchanged."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# Servers the integration tests start (Prefect, S3): a free port, health, and a stop by pid.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, grace: float = 8) -> None:
    """Stop a process we started, and its children, each by its own pid (serve and a worker may
    ignore SIGTERM for a while)."""
    import psutil

    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    for p in [proc, *kids]:
        try:
            os.kill(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    for p in [proc, *kids]:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    """Until the Prefect server at `url` (its API) answers /health; AssertionError with its log if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"prefect server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.read().strip() == b"true":
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"prefect server not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


# A retrain project beside a Prefect server (test_flows, test_promotion_recovery, and the killed
# promotion conftest's `killed_after_push` builds for the release tests).

# The workspace's TINY params, trimmed further: one epoch per retrain run.
FAST = {"train": {"epochs": 1, "batch_size": 16}}

# The demo's DICOMs carry (made-up) PatientIDs: a retrain run refuses to hash them with the public
# salt, so the worker's environment holds a secret, as a real deployment's must.
TEST_SALT = "medtune-test-secret-7c41"

RETRAIN_TIMEOUT = 600
# Open gates whatever the defaults are: a promotion test is about recording a promotion, not about the model.
# Lower bounds at 0, upper bounds (max_mae: a positive number or null) off.
OPEN_GATE = {"evaluate": {"gate": {f: None if f.startswith("max_") else 0.0 for f in GateParams.model_fields}}}
KILLED = 137

# Changed in params.yaml, and not committed, before the killed run: the release must commit it (FAST
# trains with batch_size 16; the committed params.yaml says 16, the run and dvc.lock say 8).
UNCOMMITTED_PARAMS = {"train": {"batch_size": 8}}

# Runs `medtune retrain` with one git/DVC command of components.retrain.promote (where a release runs them) followed by os._exit.
WRAPPER = """
import os, sys
sys.path.insert(0, {root!r})
from components.retrain import promote
tool, *words = sys.argv[1].split()
real = getattr(promote, tool)  # the names promote calls its git and DVC commands by

def killing(root, *args, **kwargs):
    out = real(root, *args, **kwargs)
    if list(args[:len(words)]) == words:
        print(f"KILLED after {{tool}} {{' '.join(args)}}", file=sys.stderr, flush=True)
        os._exit({killed})
    return out

setattr(promote, tool, killing)
from flows.commands import retrain_main
sys.exit(retrain_main(sys.argv[2:]))
"""


def base_env(tmp: Path, api: str) -> dict[str, str]:
    """tool_env for a Prefect server at `api` and the processes that talk to it (PREFECT_HOME under tmp)."""
    return tool_env(
        PREFECT_HOME=str(tmp / "prefect-home"),
        PREFECT_API_URL=api,
        MEDTUNE_PATIENT_SALT=TEST_SALT,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_RUNNER_POLL_FREQUENCY="2",
    )


def make_retrain_project(ws: Path, env: dict, allow_public_salt: bool) -> None:
    """A committed project whose retrain runs promote into ../dvc-remote, gates open, FAST training."""
    over = {"retrain": {"dvc_remote": "../dvc-remote", "allow_public_salt": allow_public_salt}}
    make_workspace(ws, patients=8, params=merge(merge(FAST, OPEN_GATE), over), env=env)
    (ws / ".gitignore").write_text("/models/\n/reports/\n/data/inbox\n/data/quarantine\n/data/inbox-processed\n")
    run(["git", "add", "-A"], ws, env, timeout=RETRAIN_TIMEOUT)
    run(["git", "commit", "-qm", "initial data"], ws, env, timeout=RETRAIN_TIMEOUT)


def drop_batch(ws: Path, env: dict, name: str = "2024-06") -> None:
    """A new batch of demo scans in data/inbox/batch-<name>."""
    run(
        [
            "medtune",
            "demo-data",
            "--out",
            f"data/inbox/batch-{name}",
            "--patients",
            "4",
            "--slices",
            "3",
            "--size",
            "32",
            "--batch-name",
            name,
        ],
        ws,
        env,
        timeout=RETRAIN_TIMEOUT,
    )


def retrain(ws: Path, env: dict, kill_after: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`medtune retrain --once`; with `kill_after` ("dvc push", "git commit", ...), killed (exit
    KILLED) right after promote runs that command."""
    if kill_after is None:
        return run([str(BIN / "medtune"), "retrain", "--once"], ws, env, check, timeout=RETRAIN_TIMEOUT)
    script = ws.parent / "kill_wrapper.py"
    script.write_text(WRAPPER.format(root=str(ROOT), killed=KILLED))
    out = run([sys.executable, str(script), kill_after, "--once"], ws, env, check=False, timeout=RETRAIN_TIMEOUT)
    assert out.returncode == KILLED, f"expected a kill after {kill_after}:\n{out.stdout}\n{out.stderr[-4000:]}"
    return out


def copy_of(base_ws: Path, dst: Path) -> Path:
    """The workspace and its DVC remote (../dvc-remote), copied with their mtimes."""
    shutil.copytree(base_ws.parent / "dvc-remote", dst / "dvc-remote", symlinks=True)
    shutil.copytree(base_ws, dst / "ws", symlinks=True)
    return dst / "ws"


def onnx_model_id(path: Path) -> str:
    """The model_id an exported model.onnx carries in its metadata."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}["model_id"]
