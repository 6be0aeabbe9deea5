"""Retraining end to end: a real Prefect server on 127.0.0.1, the served retrain deployment, real DVC
and git in a temporary project, real training/ONNX on tiny synthetic DICOMs.

Order matters (one served workspace, module-scoped): nothing new (quick no-op) -> a good batch via
the event (retrain, new data version, promotion as the gate says, clean dvc status) -> a bad batch
(quarantine, no change). Every process started here is stopped by its own process id.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import workspace
import yaml
from workspace import BIN, ROOT, make_workspace, merge, tool_env, tree_digest

# The workspace's TINY params, trimmed further: one epoch per retrain run.
FAST = {"train": {"epochs": 1, "batch_size": 16}}
RUN_TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The demo's DICOMs carry (made-up) PatientIDs: a retrain run refuses to hash them with the public
# salt, so the worker's environment holds a secret, as a real deployment's must.
TEST_SALT = "medtune-test-secret-7c41"


def base_env(tmp: Path, api: str) -> dict[str, str]:
    return tool_env(PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_API_URL=api, MEDTUNE_PATIENT_SALT=TEST_SALT,
                    PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PREFECT_RUNNER_POLL_FREQUENCY="2")


def run(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    return workspace.run(cmd, cwd, env, check, timeout=300)


def medtune(command: str, *args: str) -> list[str]:
    return [str(BIN / "medtune"), command, *args]


def stop(proc: subprocess.Popen) -> None:
    """Stop a process we started, and its children, each by its own pid (serve ignores SIGTERM)."""
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
        proc.wait(timeout=8)
    except subprocess.TimeoutExpired:
        pass
    for p in [proc, *kids]:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
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


def make_project(ws: Path, env: dict) -> None:
    retrain = {"retrain": {"dvc_remote": str(ws.parent / "dvc-remote"), "schedule_interval": 3600,
                           "promotion_margin": 0.05}}
    make_workspace(ws, patients=8, params=merge(FAST, retrain), env=env)
    (ws / ".gitignore").write_text("/models/\n/reports/\n/data/inbox\n/data/quarantine\n/data/inbox-processed\n")
    run(["git", "add", "-A"], ws, env)
    run(["git", "commit", "-qm", "initial data"], ws, env)


def raw_md5(ws: Path) -> str:
    return yaml.safe_load((ws / "data/raw.dvc").read_text())["outs"][0]["md5"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flows")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = base_env(tmp, api)
    saved = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_HOME")}
    # This process talks to the same server (client calls); its own PREFECT_HOME stays in tmp too.
    os.environ.update(PREFECT_API_URL=api, PREFECT_HOME=env["PREFECT_HOME"])
    # Prefect caches its settings when first imported (another test module may have imported it
    # already), so the environment alone is not enough: override the settings context too, or
    # in-process client calls start a temporary server of their own.
    from prefect.settings import PREFECT_API_URL, temporary_settings

    settings = temporary_settings(updates={PREFECT_API_URL: api})
    settings.__enter__()
    ws = tmp / "project"
    make_project(ws, env)
    procs = []
    try:
        server_log = tmp / "server.log"
        server = subprocess.Popen(medtune("server", "--port", str(port)), cwd=tmp, env=env,
                                  stdout=server_log.open("w"), stderr=subprocess.STDOUT)
        procs.append(server)
        wait_healthy(api, server, server_log)
        serve_log = tmp / "serve.log"
        serve = subprocess.Popen(medtune("serve", "--root", str(ws)), cwd=tmp,
                                 env=env, stdout=serve_log.open("w"), stderr=subprocess.STDOUT)
        procs.append(serve)
        yield {"ws": ws, "env": env, "api": api, "tmp": tmp, "serve_log": serve_log}
    finally:
        for p in reversed(procs):
            stop(p)
        settings.__exit__(None, None, None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def client_call(api: str, fn):
    """Run `fn(client)` against the test server in this process (prefect reads PREFECT_API_URL)."""
    import asyncio

    from prefect.client.orchestration import get_client

    async def go():
        async with get_client() as client:
            return await fn(client)
    return asyncio.run(go())


def retrain_runs(api: str) -> list:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    async def fn(client):
        return await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["medtune-retrain"])),
                                           sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=200)
    return client_call(api, fn)


def wait_deployment(api: str, timeout: float = 60) -> object:
    async def fn(client):
        return await client.read_deployment_by_name("medtune-retrain/retrain")
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client_call(api, fn)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def wait_new_run(api: str, known: set, serve_log: Path, timeout: float = RUN_TIMEOUT):
    """The first retrain run not in `known` that reaches a final state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in retrain_runs(api):
            if r.id not in known and r.state is not None and r.state.is_final():
                return r
        time.sleep(1)
    raise AssertionError(f"no retrain run finished within {timeout} s:\n{serve_log.read_text()[-4000:]}")


def test_deployment_has_schedule_and_event_trigger(served):
    dep = wait_deployment(served["api"])
    assert dep.schedules, "retrain deployment must run on a schedule"
    assert dep.schedules[0].schedule.interval.total_seconds() == 3600
    assert dep.parameters["trigger"] == "schedule"


def test_nothing_new_is_a_quick_noop(served):
    from prefect.deployments import run_deployment

    ws, api = served["ws"], served["api"]
    wait_deployment(api)
    head = run(["git", "rev-parse", "HEAD"], ws, served["env"]).stdout
    fr = run_deployment("medtune-retrain/retrain", parameters={"trigger": "manual"}, timeout=120)
    assert fr.state.is_completed(), fr.state
    took = (fr.end_time - fr.start_time).total_seconds()
    assert took < 5, f"no-op retrain took {took:.1f} s"
    assert run(["git", "rev-parse", "HEAD"], ws, served["env"]).stdout == head
    assert "nothing new" in served["serve_log"].read_text()


def test_good_batch_event_retrains_and_records_the_decision(served):

    ws, env, api, tmp = served["ws"], served["env"], served["api"], served["tmp"]
    before_md5, raw_before = raw_md5(ws), tree_digest(ws / "data/raw")
    known = {r.id for r in retrain_runs(api)}
    batch = tmp / "batch-2024-06"
    run(["medtune", "demo-data", "--out", str(batch), "--patients", "4", "--slices", "3", "--size", "32",
         "--batch-name", "2024-06"], ws, env)
    sent = time.time()
    out = run(medtune("ingest-new", str(batch)), ws, env)
    assert "emitted" in out.stdout, out.stdout + out.stderr

    fr = wait_new_run(api, known, served["serve_log"])
    assert fr.state.is_completed(), served["serve_log"].read_text()[-4000:]
    assert fr.parameters["trigger"] == "event"
    latency = fr.start_time.timestamp() - sent
    print(f"event -> retrain run start: {latency:.1f} s; run took {(fr.end_time - fr.start_time).total_seconds():.1f} s")
    assert latency < 30

    # The data version changed, the old raw files are untouched, the batch was archived.
    after_md5 = raw_md5(ws)
    assert after_md5 != before_md5
    raw_after = tree_digest(ws / "data/raw")
    assert all(raw_after[k] == v for k, v in raw_before.items())
    assert any("/batch-2024-06/" in k for k in raw_after)
    assert not list((ws / "data/inbox").iterdir())

    # dvc.lock describes what the flow produced; dvc status is clean; git holds it all.
    assert "up to date" in run(["dvc", "status"], ws, env).stdout
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    dep = next(d for d in lock["stages"]["ingest"]["deps"] if d["path"] == "data/raw")
    assert dep["md5"] == after_md5
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], ws, env).stdout == ""

    # The decision follows the gate; it is recorded (and tagged when promoted).
    gate = json.loads((ws / "reports/gate.json").read_text())
    rec = [json.loads(x) for x in (ws / "registry/releases.jsonl").read_text().splitlines()][-1]
    assert rec["trigger"] == "event" and rec["flow_run_id"] == str(fr.id) and rec["data_version"] == after_md5
    assert rec["challenger"]["metrics"]["auroc"] == json.loads((ws / "reports/metrics.json").read_text())["auroc"]
    if gate["passed"]:  # first model: no champion, so the gate alone decides
        lineage = json.loads((ws / "models/lineage.json").read_text())
        assert rec["event"] == "promoted" and rec["model_id"] == lineage["model_id"]
        assert json.loads((ws / "registry/current.json").read_text()) == {"model_id": lineage["model_id"],
                                                                           "git_tag": rec["git_tag"]}
        assert run(["git", "tag", "--list", rec["git_tag"]], ws, env).stdout.strip() == rec["git_tag"]
        assert (ws / f"registry/models/{lineage['model_id']}/lineage.json").is_file()
        assert any((tmp / "dvc-remote").rglob("*")), "dvc push must fill the remote"
    else:
        assert rec["event"] == "rejected" and not (ws / "registry/current.json").exists()

    # No patient identifier in the records, and the hashes come from the secret salt.
    secret = {"status": "secret", "source": "MEDTUNE_PATIENT_SALT", "real_patient_ids": True}
    assert json.loads((ws / "data/manifest.json").read_text())["patient_salt"] == secret
    assert TEST_SALT not in (ws / "data/manifest.json").read_text() + served["serve_log"].read_text()
    for f in (ws / "registry").rglob("*"):
        if f.is_file():
            assert b"DEMO-0" not in f.read_bytes() and b"Demo^Patient" not in f.read_bytes(), f

    # Plain REST: this prefect client's read_artifacts sends null filters that its own server rejects.
    keys = ["medtune-validation", "medtune-metrics", "medtune-gate", "medtune-lineage", "medtune-decision"]
    req = urllib.request.Request(f"{api}/artifacts/filter", method="POST", headers={"content-type": "application/json"},
                                 data=json.dumps({"limit": 200, "artifacts": {"key": {"any_": keys}}}).encode())
    with urllib.request.urlopen(req, timeout=10) as r:
        found = {a["key"] for a in json.load(r)}
    assert found >= {"medtune-validation", "medtune-metrics", "medtune-gate", "medtune-decision"}, found
    if gate["passed"]:
        assert "medtune-lineage" in found


def test_bad_batch_is_quarantined_and_nothing_changes(served):
    ws, env, api, tmp = served["ws"], served["env"], served["api"], served["tmp"]
    head = run(["git", "rev-parse", "HEAD"], ws, env).stdout
    md5, releases = raw_md5(ws), (ws / "registry/releases.jsonl").read_text()
    raw_before = tree_digest(ws / "data/raw")
    known = {r.id for r in retrain_runs(api)}
    bad = tmp / "bad-batch"
    existing = sorted((ws / "data/raw/lesion").glob("*.dcm"))[0]
    (bad / "lesion").mkdir(parents=True)
    shutil.copy(existing, bad / "lesion" / "copy.dcm")  # a duplicate of a scan already in the data
    (bad / "tumour").mkdir()
    shutil.copy(sorted((ws / "data/raw/normal").glob("*.dcm"))[0], bad / "tumour" / "x.dcm")  # unknown label
    run(medtune("ingest-new", str(bad)), ws, env)

    fr = wait_new_run(api, known, served["serve_log"])
    assert fr.state.is_completed()
    assert (fr.end_time - fr.start_time).total_seconds() < 30
    reports = list((ws / "data/quarantine").glob("bad-batch-*/report.json"))
    assert len(reports) == 1
    problems = json.loads(reports[0].read_text())["problems"]
    text = "\n".join(problems)
    assert "copy.dcm" in text and "duplicates" in text and "'tumour'" in text, text
    assert (reports[0].parent / "batch/lesion/copy.dcm").is_file()
    assert run(["git", "rev-parse", "HEAD"], ws, env).stdout == head
    assert raw_md5(ws) == md5 and tree_digest(ws / "data/raw") == raw_before
    assert (ws / "registry/releases.jsonl").read_text() == releases


def test_pipeline_failure_after_append_restores_quarantines_and_fails(served):
    """A batch that passes its own checks, then the whole-data validation stops the pipeline.

    The run is given a params file whose validate.min_images_per_class_split no split can meet (a
    check that only the whole data set is subject to). Expected: the run fails, the workspace is
    back to the last commit (raw files, raw.dvc, dvc.lock, outputs: dvc status clean), the batch is
    quarantined with the error, a `failed` event is committed, and the champion stays.
    """
    from prefect.deployments import run_deployment

    ws, env, tmp = served["ws"], served["env"], served["tmp"]
    head = run(["git", "rev-parse", "HEAD"], ws, env).stdout.strip()
    md5, raw_before = raw_md5(ws), tree_digest(ws / "data/raw")
    manifest_before = (ws / "data/manifest.csv").read_bytes()
    validation_before = (ws / "reports/validation.json").read_bytes()
    current_before = (ws / "registry/current.json").read_text() if (ws / "registry/current.json").exists() else None
    strict = yaml.safe_load((ws / "params.yaml").read_text())
    strict["validate"]["min_images_per_class_split"] = 1000
    (ws / "params-strict.yaml").write_text(yaml.safe_dump(strict))
    batch = tmp / "batch-2024-08"
    run(["medtune", "demo-data", "--out", str(batch), "--patients", "2", "--slices", "2", "--size", "32",
         "--batch-name", "2024-08"], ws, env)
    originals = tree_digest(batch)
    run(medtune("ingest-new", str(batch), "--no-event"), ws, env)

    fr = run_deployment("medtune-retrain/retrain", timeout=RUN_TIMEOUT,
                        parameters={"params": "params-strict.yaml", "trigger": "manual"})
    assert fr.state.is_failed(), (fr.state, served["serve_log"].read_text()[-4000:])
    print(f"failed retrain run with restore took {(fr.end_time - fr.start_time).total_seconds():.1f} s")

    # The workspace is the last committed state again; only the failed event was committed.
    assert raw_md5(ws) == md5 and tree_digest(ws / "data/raw") == raw_before
    assert (ws / "data/manifest.csv").read_bytes() == manifest_before
    assert (ws / "reports/validation.json").read_bytes() == validation_before
    assert "up to date" in run(["dvc", "status"], ws, env).stdout
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], ws, env).stdout == ""
    changed = run(["git", "diff", "--name-only", head, "HEAD"], ws, env).stdout.split()
    assert changed == ["registry/releases.jsonl"]

    # The batch is in quarantine, unchanged, with the error; the inbox is empty; the champion stays.
    reports = list((ws / "data/quarantine").glob("batch-2024-08-*/report.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    assert "images_per_class_split" in report["problems"][0] and "validate" in report["failure"]["error"]
    assert tree_digest(reports[0].parent / "batch") == originals
    assert "images_per_class_split" in (reports[0].parent / "failed-run/reports/validation.md").read_text()
    assert not list((ws / "data/inbox").iterdir())
    rec = [json.loads(x) for x in (ws / "registry/releases.jsonl").read_text().splitlines()][-1]
    assert rec["event"] == "failed" and rec["model_id"] is None and rec["flow_run_id"] == str(fr.id)
    assert rec["data_version"] == md5 and rec["batches"][0]["batch"] == "batch-2024-08"
    assert "images_per_class_split" in rec["reasons"][0]
    now = (ws / "registry/current.json").read_text() if (ws / "registry/current.json").exists() else None
    assert now == current_before


# ---------------------------------------------------------------------------------------------
# The glue under the flows (no server needed)
# ---------------------------------------------------------------------------------------------

def test_a_second_run_waits_for_the_workspace_lock_and_says_who_holds_it(tmp_path):
    from components import orchestrate
    from components.common import StageError

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from components.orchestrate import workspace_lock\n"
        "with workspace_lock(sys.argv[1], 'retrain flow run R1 (pid 42)', 5):\n"
        "    print('locked', flush=True); time.sleep(60)\n"), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        told = []
        start = time.monotonic()
        with pytest.raises(StageError, match="held by retrain flow run R1"):
            with orchestrate.workspace_lock(tmp_path, "second", 1.5, told.append):
                pass
        assert time.monotonic() - start >= 1.5 and told == ["retrain flow run R1 (pid 42)"]
    finally:
        stop(holder)
    with orchestrate.workspace_lock(tmp_path, "second", 5):  # released when its holder died
        pass


def test_run_stage_raises_with_the_stage_own_error(tmp_path, monkeypatch):
    from components import orchestrate
    from components.common import StageError

    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    with pytest.raises(StageError, match=r"stage validate failed \(exit 1\): .*manifest"):
        orchestrate.run_stage("validate", "params.yaml")
    with pytest.raises(ValueError, match="stage 'deploy' is unknown"):
        orchestrate.run_stage("deploy")
