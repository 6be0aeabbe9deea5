"""Killed parents leave no working children, and one process at a time writes a stage's outputs.

Real processes throughout: `dvc repro` killed with -9 in the middle of training (through bash,
which execs the stage command, through dash, which stays in between, and with torchrun's chain of
processes); a real `medtune <stage>` refused while another process holds the stage; and the
temporary Prefect server of a `medtune retrain --once` killed with -9 (components/lifetime.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from components.retrain import stages
from components.retrain import workspace as project
from flows import prefect_server
from tests.workspace import ROOT, make_workspace, run, set_params, tool_env

pytestmark = pytest.mark.slow
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")

# Far more training than the test waits for: the stage is still running when dvc is killed.
LONG_TRAIN = {"train": {"epochs": 1000, "patience": 1000}}
TIMEOUT = 120  # generous upper bounds for polling; the conditions normally hold within seconds


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def alive(p: psutil.Process) -> bool:
    # A zombie has exited; it only waits for its (new) parent to reap it.
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def kill_all(procs) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def is_stage(p: psutil.Process, stage: str) -> bool:
    args = cmdline(p)
    return any(Path(a).name == "medtune" for a in args) and stage in args


@pytest.fixture(scope="module")
def prepared(module_tmp):
    """A project whose stages up to augment are done; train is what each test starts and kills."""
    ws = make_workspace(module_tmp / "ws", params=LONG_TRAIN)
    run(["dvc", "repro", "augment"], ws, timeout=600)
    return ws


def start_repro(ws: Path, log: Path, shell: str) -> subprocess.Popen:
    # DVC runs a stage as `$SHELL -c "<cmd>"` (dvc/stage/run.py): SHELL picks the shell.
    with open(log, "w") as fh:
        return subprocess.Popen(
            ["dvc", "repro", "train"], cwd=ws, env=tool_env(SHELL=shell), stdout=fh, stderr=subprocess.STDOUT
        )


def kill_dvc_during_training(ws: Path, tmp_path: Path, shell: str, workers: int) -> tuple[list[psutil.Process], str]:
    """Start `dvc repro train`, wait until training runs (epoch 1 logged and, with torchrun, every
    worker up), kill dvc with -9 and reap it; return the stage's processes (as they were) and the
    name of the train process's parent."""
    log = tmp_path / "repro.log"
    dvc = start_repro(ws, log, shell)
    procs: list[psutil.Process] = []
    try:
        wait_for(lambda: "epoch 1:" in log.read_text() or dvc.poll() is not None, TIMEOUT, "training to start")
        assert dvc.poll() is None, f"dvc repro ended before the kill:\n{log.read_text()[-3000:]}"
        tree = psutil.Process(dvc.pid).children(recursive=True)
        train = next(p for p in tree if is_stage(p, "train"))
        procs = [train, *train.children(recursive=True)]
        agents = [p for p in procs if "torch.distributed.run" in cmdline(p)]
        ranks = [p for p in procs if "components.model.train" in cmdline(p) and p not in agents]
        assert (len(agents), len(ranks)) == ((1, workers) if workers > 1 else (0, 0)), [cmdline(p) for p in procs]
        parent = train.parent().name()
        dvc.send_signal(signal.SIGKILL)
        dvc.wait()  # reaped: a zombie dvc would still look alive to DVC's next run and to psutil
        return procs, parent
    except BaseException:
        kill_all(procs)
        dvc.kill()
        dvc.wait()
        raise


def assert_all_gone(procs: list[psutil.Process]) -> None:
    try:
        wait_for(lambda: not any(alive(p) for p in procs), TIMEOUT, "the stage's processes to end")
    except AssertionError:
        survivors = [" ".join(cmdline(p)) for p in procs if alive(p)]
        kill_all(procs)  # leave no orphan training behind a failed test
        raise AssertionError(f"still running after dvc was killed: {survivors}") from None


@linux_only
@pytest.mark.parametrize("shell", ["/bin/bash", "/bin/dash"])
def test_killing_dvc_stops_the_training_it_started(prepared, tmp_path, shell):
    if not Path(shell).exists():
        pytest.skip(f"{shell} is not installed")
    procs, parent = kill_dvc_during_training(prepared, tmp_path, shell, workers=1)
    # bash execs a lone command, so dvc is the parent (the parent-death signal); dash stays in
    # between and outlives dvc (the watch on the starter above the shell).
    assert parent == ("dvc" if shell.endswith("bash") else "dash"), parent
    assert_all_gone(procs)


@linux_only
def test_killing_dvc_stops_torchrun_and_its_workers(prepared, tmp_path):
    set_params(prepared, {"train": {"processes": 2}})
    try:
        procs, _ = kill_dvc_during_training(prepared, tmp_path, "/bin/bash", workers=2)
        assert_all_gone(procs)  # the launcher, torchrun and both workers
    finally:
        set_params(prepared, {"train": {"processes": 1}})


# ---------------------------------------------------------------------------------------------
# One writer per stage
# ---------------------------------------------------------------------------------------------

HOLD = """
import sys
from components.lifetime import stage_lock
with stage_lock(sys.argv[1], sys.argv[2], "test holder"):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def holder(prepared):
    """Another live process holding the augment stage's lock in the workspace."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, "augment", str(prepared)],
        cwd=ROOT,
        env=tool_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def outputs_state(ws: Path) -> dict[str, tuple[int, bytes]]:
    return {p: ((ws / p).stat().st_mtime_ns, (ws / p).read_bytes()) for p in ("reports/augment_preview.png",)}


def test_a_second_writer_of_a_stage_is_refused_naming_the_holder(prepared, holder):
    before = outputs_state(prepared)
    out = run(["medtune", "augment"], prepared, check=False, timeout=TIMEOUT)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: stage augment is already running")
    assert f"pid {holder.pid}" in lines[0] and "reports/augment_preview.png" in lines[0]
    assert f"kill {holder.pid}" in lines[0]
    assert outputs_state(prepared) == before, "the refused stage touched its output"


def test_a_flow_stage_is_refused_too(prepared, holder, monkeypatch):
    from components.lifetime import StageBusy

    monkeypatch.chdir(prepared)
    before = outputs_state(prepared)
    with pytest.raises(StageBusy, match=f"stage augment is already running.*pid {holder.pid}"):
        stages.run_stage("augment")
    assert outputs_state(prepared) == before


def test_the_lock_of_a_killed_holder_is_free_again(prepared, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    out = run(["medtune", "augment"], prepared, check=False, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr


# ---------------------------------------------------------------------------------------------
# The temporary Prefect server of `medtune retrain --once`
# ---------------------------------------------------------------------------------------------


def prefect_env(tmp_path: Path) -> dict[str, str]:
    env = tool_env(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        MEDTUNE_PATIENT_SALT="test-salt",
        # Prefect's own setting (20 s by default): a loaded CI machine can take longer to start a server.
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    )
    env.pop("PREFECT_API_URL", None)  # no server configured: the run needs a temporary one
    return env


def is_prefect_server(p: psutil.Process) -> bool:
    return "prefect.server.api.server:create_app" in cmdline(p)


@linux_only
def test_the_temporary_prefect_server_dies_with_a_killed_retrain(prepared, tmp_path):

    # A batch in the inbox, and the workspace held by "another run": the retrain run waits for it,
    # with its flow run on the temporary server, until it is killed.
    batch = prepared / "data/inbox/batch-1"
    batch.mkdir(parents=True)
    (batch / "labels.csv").write_text("path,label\n")
    log = tmp_path / "retrain.log"
    server = None
    try:
        with project.workspace_lock(prepared, "the test", timeout=1), open(log, "w") as fh:
            retrain = subprocess.Popen(
                ["medtune", "retrain", "--once"],
                cwd=prepared,
                env=prefect_env(tmp_path),
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
            try:
                wait_for(
                    lambda: "holds the workspace" in log.read_text() or retrain.poll() is not None,
                    TIMEOUT,
                    "the retrain run to wait for the workspace",
                )
                assert retrain.poll() is None, log.read_text()[-3000:]
                server = next(p for p in psutil.Process(retrain.pid).children(recursive=True) if is_prefect_server(p))
            finally:
                retrain.send_signal(signal.SIGKILL)
                retrain.wait()
        wait_for(lambda: not alive(server), TIMEOUT, f"the temporary Prefect server (pid {server.pid}) to end")
    finally:
        if server is not None:
            kill_all([server])
        shutil.rmtree(prepared / "data/inbox")


@linux_only
def test_the_temporary_prefect_server_stops_when_the_run_ends(tmp_path, monkeypatch):
    # In this process, which lives on: only the context's own stop can end the server.
    from prefect.context import refresh_global_settings_context

    for key, value in prefect_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    refresh_global_settings_context()
    try:
        with prefect_server.prefect_api() as url:
            assert url and url.startswith("http://127.0.0.1:") and os.environ["PREFECT_API_URL"] == url
            server = next(p for p in psutil.Process().children() if is_prefect_server(p))
            assert alive(server)
        assert "PREFECT_API_URL" not in os.environ
        wait_for(lambda: not alive(server), TIMEOUT, "the temporary Prefect server to stop")
    finally:
        refresh_global_settings_context()
