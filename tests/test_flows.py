"""Retraining and the pipeline flow end to end: a real Prefect server on 127.0.0.1, the served retrain
deployment, real DVC and git in a temporary project, real training/ONNX on tiny synthetic DICOMs.

Order matters (one served workspace, module-scoped): nothing new (quick no-op) -> a good batch via
the event (retrain, new data version, promotion as the gate says, clean dvc status; its pipeline
subflow ran every stage, logs on the server) -> a bad batch (quarantine, no change) -> a failed
pipeline after the append (restored) -> `medtune pipeline` with nothing changed (every stage skipped)
-> one changed param (only the stages that read it run). Every process started here is stopped by
its own process id.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from components.retrain import stages
from components.retrain import workspace as project
from tests import workspace
from tests.workspace import (
    BIN,
    FAST,
    TEST_SALT,
    base_env,
    free_port,
    make_workspace,
    merge,
    set_params,
    stop,
    tree_digest,
    wait_healthy,
)

pytestmark = pytest.mark.slow

RUN_TIMEOUT = 300


def run(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    return workspace.run(cmd, cwd, env, check, timeout=300)


def medtune(command: str, *args: str) -> list[str]:
    return [str(BIN / "medtune"), command, *args]


def make_project(ws: Path, env: dict) -> None:
    retrain = {
        "retrain": {"dvc_remote": str(ws.parent / "dvc-remote"), "schedule_interval": 3600, "promotion_margin": 0.05}
    }
    make_workspace(ws, patients=8, params=merge(FAST, retrain), env=env)
    (ws / ".gitignore").write_text("/models/\n/reports/\n/data/inbox\n/data/quarantine\n/data/inbox-processed\n")
    run(["git", "add", "-A"], ws, env)
    run(["git", "commit", "-qm", "initial data"], ws, env)


def raw_md5(ws: Path) -> str:
    return yaml.safe_load((ws / "data/raw.dvc").read_text())["outs"][0]["md5"]


@pytest.fixture(scope="module")
def served(module_tmp):
    tmp = module_tmp
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
        server = subprocess.Popen(
            medtune("server", "--port", str(port)),
            cwd=tmp,
            env=env,
            stdout=server_log.open("w"),
            stderr=subprocess.STDOUT,
        )
        procs.append(server)
        wait_healthy(api, server, server_log)
        serve_log = tmp / "serve.log"
        serve = subprocess.Popen(
            medtune("serve", "--root", str(ws)), cwd=tmp, env=env, stdout=serve_log.open("w"), stderr=subprocess.STDOUT
        )
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
        return await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["medtune-retrain"])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=200,
        )

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


def api_post(api: str, path: str, body: dict) -> list | dict:
    """Plain REST: this prefect client's read_* calls send null filters that its own server rejects."""
    req = urllib.request.Request(
        f"{api}{path}", method="POST", headers={"content-type": "application/json"}, data=json.dumps(body).encode()
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def pipeline_subflow(api: str, parent_run_id) -> dict:
    """The medtune-pipeline flow run that the retrain run `parent_run_id` ran as its subflow."""
    runs = api_post(api, "/flow_runs/filter", {"flows": {"name": {"any_": ["medtune-pipeline"]}}, "limit": 200})
    parents = {r["parent_task_run_id"]: r for r in runs if r.get("parent_task_run_id")}
    tasks = (
        api_post(api, "/task_runs/filter", {"task_runs": {"id": {"any_": list(parents)}}, "limit": 200})
        if parents
        else []
    )
    mine = [parents[t["id"]] for t in tasks if t["flow_run_id"] == str(parent_run_id)]
    assert len(mine) == 1, f"expected one pipeline subflow of retrain run {parent_run_id}, found {len(mine)}"
    return mine[0]


def task_states(api: str, flow_run_id: str) -> dict[str, dict]:
    """Task run name -> its final state (type, name, message), of one flow run, from the server."""
    tasks = api_post(api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [str(flow_run_id)]}}, "limit": 200})
    return {t["name"]: {**t["state"], "id": t["id"]} for t in tasks}


def server_logs(api: str, flow_run_id: str, want: list[str], timeout: float = 60) -> list[dict]:
    """Every log line of the flow run on the server, read until each string in `want` is in one of them
    (a process sends its log lines in batches, so the last ones can arrive after the run ended)."""
    deadline = time.monotonic() + timeout
    while True:
        logs, offset = [], 0
        while True:
            page = api_post(
                api,
                "/logs/filter",
                {
                    "logs": {"flow_run_id": {"any_": [str(flow_run_id)]}},
                    "sort": "TIMESTAMP_ASC",
                    "limit": 200,
                    "offset": offset,
                },
            )
            logs += page
            if len(page) < 200:
                break
            offset += 200
        if all(any(w in x["message"] for x in logs) for w in want) or time.monotonic() > deadline:
            return logs
        time.sleep(1)


def stage_names(ws: Path) -> list[str]:

    return [s.name for s in stages.pipeline_stages(ws)]  # dvc.yaml's stages, as DVC orders them


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
    run(
        [
            "medtune",
            "demo-data",
            "--out",
            str(batch),
            "--patients",
            "4",
            "--slices",
            "3",
            "--size",
            "32",
            "--batch-name",
            "2024-06",
        ],
        ws,
        env,
    )
    sent = time.time()
    out = run(medtune("ingest-new", str(batch)), ws, env)
    assert "emitted" in out.stdout, out.stdout + out.stderr

    fr = wait_new_run(api, known, served["serve_log"])
    assert fr.state.is_completed(), served["serve_log"].read_text()[-4000:]
    assert fr.parameters["trigger"] == "event"
    logs = server_logs(api, fr.id, ["cold start: no champion yet"])  # the first model: nothing to warm start from
    assert any(x["message"] == "cold start: no champion yet" for x in logs), [x["message"] for x in logs][-30:]
    served["first_retrain"] = fr.id  # its pipeline subflow is the workspace's first pipeline run
    latency = fr.start_time.timestamp() - sent
    # Printed, not asserted: how fast the event starts a run is a property of the machine's load.
    print(
        f"event -> retrain run start: {latency:.1f} s; run took {(fr.end_time - fr.start_time).total_seconds():.1f} s"
    )

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
        assert json.loads((ws / "registry/current.json").read_text()) == {
            "model_id": lineage["model_id"],
            "git_tag": rec["git_tag"],
        }
        assert run(["git", "tag", "--list", rec["git_tag"]], ws, env).stdout.strip() == rec["git_tag"]
        assert (ws / f"registry/models/{lineage['model_id']}/lineage.json").is_file()
        assert any((tmp / "dvc-remote").rglob("*")), "dvc push must fill the remote"
        # The promoted model's audit report: written beside its records, never committed (it shows scans).
        audit = ws / f"registry/models/{lineage['model_id']}/report.html"
        text = audit.read_text(encoding="utf-8")
        assert lineage["data"]["data_version"] in text and lineage["code"]["git_commit"] in text
        samples = len(list((ws / "reports/explanations").rglob("*.png")))
        assert text.count('<img src="data:image/png;base64,') == 4 + samples  # ROC, confusion, curves, preview
        assert run(["git", "check-ignore", "-q", str(audit)], ws, env, check=False).returncode == 0
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
    keys = [
        "medtune-validation",
        "medtune-metrics",
        "medtune-gate",
        "medtune-lineage",
        "medtune-decision",
        "medtune-report",
    ]
    req = urllib.request.Request(
        f"{api}/artifacts/filter",
        method="POST",
        headers={"content-type": "application/json"},
        data=json.dumps({"limit": 200, "artifacts": {"key": {"any_": keys}}}).encode(),
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        found = {a["key"] for a in json.load(r)}
    assert found >= {"medtune-validation", "medtune-metrics", "medtune-gate", "medtune-decision"}, found
    if gate["passed"]:
        assert "medtune-lineage" in found and "medtune-report" in found


def test_the_first_pipeline_run_ran_every_stage_and_its_stage_logs_are_on_the_server(served):
    """The retrain run's pipeline subflow, on a workspace that never ran the pipeline: every dvc.yaml
    stage ran (`dvc repro --single-item`, task state Completed), and the stages' own log lines (a
    training epoch, the gate decision) are in that flow run's logs on the server, under their task."""
    ws, api = served["ws"], served["api"]
    sub = pipeline_subflow(api, served["first_retrain"])
    states = task_states(api, sub["id"])
    names = stage_names(ws)
    # dvc.yaml lists its stages in an order DVC's graph allows, so DVC's order is the listing's.
    assert names == list(yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]), names
    for name in names:
        assert states.get(name, {}).get("name") == "Completed", f"task {name}: {states.get(name)}; all: {states}"
        assert states[name]["message"].startswith("ran"), states[name]
    logs = server_logs(api, sub["id"], ["epoch 1:", "gate "])
    by_task = {}
    for x in logs:
        by_task.setdefault(x["task_run_id"], []).append(x["message"])
    train, evaluate = by_task.get(states["train"]["id"], []), by_task.get(states["evaluate"]["id"], [])
    assert any("Running stage 'train':" in m for m in train), train[:20]
    assert any("medtune.train: epoch 1:" in m for m in train), f"no epoch line from train on the server: {train[:40]}"
    assert any("gate PASSED" in m or "GATE FAILED" in m for m in evaluate), f"no gate line: {evaluate[:40]}"


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

    params.yaml is given a validate.min_images_per_class_split no split can meet (a check that only
    the whole data set is subject to; the pipeline's stages read params.yaml, as DVC gives it to
    them). Expected: the run fails, the workspace is back to the last commit (raw files, raw.dvc,
    dvc.lock, outputs: dvc status clean once the test undoes its own params edit), the batch is
    quarantined with the error, a `failed` event is committed, the champion stays, and the
    validation failure is in the pipeline subflow's logs on the server.
    """
    from prefect.deployments import run_deployment

    ws, env, tmp = served["ws"], served["env"], served["tmp"]
    head = run(["git", "rev-parse", "HEAD"], ws, env).stdout.strip()
    md5, raw_before = raw_md5(ws), tree_digest(ws / "data/raw")
    manifest_before = (ws / "data/manifest.csv").read_bytes()
    validation_before = (ws / "reports/validation.json").read_bytes()
    current_before = (ws / "registry/current.json").read_text() if (ws / "registry/current.json").exists() else None
    batch = tmp / "batch-2024-08"
    run(
        [
            "medtune",
            "demo-data",
            "--out",
            str(batch),
            "--patients",
            "2",
            "--slices",
            "2",
            "--size",
            "32",
            "--batch-name",
            "2024-08",
        ],
        ws,
        env,
    )
    originals = tree_digest(batch)
    run(medtune("ingest-new", str(batch), "--no-event"), ws, env)

    set_params(ws, {"validate": {"min_images_per_class_split": 1000}})
    edited = (ws / "params.yaml").read_text()
    try:
        fr = run_deployment("medtune-retrain/retrain", timeout=RUN_TIMEOUT, parameters={"trigger": "manual"})
        after = (ws / "params.yaml").read_text()
    finally:
        run(["git", "checkout", "--", "params.yaml"], ws, env)  # the user's edit; the run leaves it alone
    # The run set train.init_from before the pipeline (a warm start from the champion, when there is one)
    # and put params.yaml back as it was, the user's uncommitted edit included.
    assert after == edited
    if current_before:
        champion = json.loads(current_before)["model_id"]
        logs = server_logs(served["api"], fr.id, [f"warm start from champion {champion}"])
        assert any(f"warm start from champion {champion} (sha256 " in x["message"] for x in logs), [
            x["message"] for x in logs
        ][-30:]
    assert fr.state.is_failed(), (fr.state, served["serve_log"].read_text()[-4000:])
    print(f"failed retrain run with restore took {(fr.end_time - fr.start_time).total_seconds():.1f} s")
    sub = pipeline_subflow(served["api"], fr.id)
    validate = task_states(served["api"], sub["id"])["validate"]
    assert validate["type"] == "FAILED" and "images_per_class_split" in validate["message"], validate
    logs = server_logs(served["api"], sub["id"], ["images_per_class_split"])
    assert any("images_per_class_split" in x["message"] and x["task_run_id"] == validate["id"] for x in logs), [
        x["message"] for x in logs
    ][-30:]

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


def run_pipeline_command(served, exit_code: int = 0) -> tuple[dict, str, float]:
    """`medtune pipeline` in its own process against the test server: (result, stderr, seconds)."""
    start = time.monotonic()
    out = run(medtune("pipeline", "--root", str(served["ws"])), served["tmp"], served["env"], check=False)
    assert out.returncode == exit_code, out.stdout[-2000:] + out.stderr[-3000:]
    return json.loads(out.stdout), out.stderr, time.monotonic() - start


def test_medtune_pipeline_with_nothing_changed_runs_no_stage_and_says_so(served):
    """After the runs above, nothing changed: DVC skips every stage, each task ends Skipped, DVC leaves
    dvc.lock as it was (no `dvc commit --force` rewriting it), and git sees no change."""
    ws, env, api = served["ws"], served["env"], served["api"]
    lock = (ws / "dvc.lock").read_bytes()
    result, err, took = run_pipeline_command(served)
    print(f"medtune pipeline, nothing changed: {took:.1f} s")
    names = stage_names(ws)
    assert result["stages"] == {name: "skipped" for name in names}, result["stages"]
    assert result["ran"] == [] and "up to date" in result["dvc_status"], result
    for name in names:
        assert f"{name}  " in err and "skipped: unchanged since dvc.lock" in err, err[-3000:]
    states = task_states(api, result["flow_run_id"])
    for name in names:
        assert states.get(name, {}).get("name") == "Skipped", f"task {name}: {states.get(name)}"
        assert states[name]["type"] == "COMPLETED" and "unchanged" in states[name]["message"], states[name]
    assert (ws / "dvc.lock").read_bytes() == lock
    assert "up to date" in run(["dvc", "status"], ws, env).stdout
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], ws, env).stdout == ""
    logs = server_logs(api, result["flow_run_id"], ["Stage 'train' didn't change, skipping"])
    assert any(x["message"] == "Stage 'train' didn't change, skipping" for x in logs), [x["message"] for x in logs]


def test_one_changed_param_reruns_only_the_stages_that_read_it(served):
    """evaluate.bootstrap changes: DVC reruns evaluate and export (which records every param), skips
    the rest, and writes the new value into dvc.lock itself."""
    ws, env, api = served["ws"], served["env"], served["api"]
    before = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    bootstrap = yaml.safe_load((ws / "params.yaml").read_text())["evaluate"]["bootstrap"] + 10
    set_params(ws, {"evaluate": {"bootstrap": bootstrap}})
    result, _, took = run_pipeline_command(served)
    print(f"medtune pipeline, evaluate.bootstrap changed: {took:.1f} s")
    rerun = {"evaluate", "export"}
    assert result["stages"] == {n: "ran" if n in rerun else "skipped" for n in stage_names(ws)}, result["stages"]
    states = task_states(api, result["flow_run_id"])
    assert {n: states[n]["name"] for n in result["stages"]} == {
        n: "Completed" if n in rerun else "Skipped" for n in result["stages"]
    }
    after = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    assert after["evaluate"]["params"]["params.yaml"]["evaluate"]["bootstrap"] == bootstrap
    assert {n: after[n] for n in after if n not in rerun} == {n: before[n] for n in before if n not in rerun}
    assert "up to date" in run(["dvc", "status"], ws, env).stdout
    assert result["model_id"] and result["model_id"] == json.loads((ws / "models/lineage.json").read_text())["model_id"]


def test_a_failed_gate_stops_before_export_and_the_flow_says_so(served):
    """A gate no model can pass: evaluate runs (its params changed), export is not run (task state
    "Gate failed", the reasons in its message), the run has no model, and DVC still sees export
    out of date, as after a `dvc repro` that export refused."""
    ws, env, api = served["ws"], served["env"], served["api"]
    set_params(ws, {"evaluate": {"gate": {"min_auroc": 1.01}}})
    result, err, _ = run_pipeline_command(served, exit_code=1)  # no model this run, as `dvc repro` fails
    assert result["stages"]["evaluate"] == "ran" and result["stages"]["export"] == "gate-failed", result["stages"]
    assert result["gate"]["passed"] is False and result["model_id"] is None, result
    assert "not run: the gate failed" in err and "error: the model failed the gate" in err, err[-3000:]
    export = task_states(api, result["flow_run_id"])["export"]
    assert export["name"] == "Gate failed" and "min_auroc" in export["message"], export
    status = run(["dvc", "status"], ws, env).stdout
    assert "export:" in status and "evaluate:" not in status, status


# ---------------------------------------------------------------------------------------------
# The glue under the flows (no server needed)
# ---------------------------------------------------------------------------------------------


def test_a_second_run_waits_for_the_workspace_lock_and_says_who_holds_it(tmp_path):
    from components.common import StageError

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from components.retrain.workspace import workspace_lock\n"
                "with workspace_lock(sys.argv[1], 'retrain flow run R1 (pid 42)', 5):\n"
                "    print('locked', flush=True); time.sleep(60)\n"
            ),
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        told = []
        start = time.monotonic()
        with pytest.raises(StageError, match="held by retrain flow run R1"):
            with project.workspace_lock(tmp_path, "second", 1.5, told.append):
                pass
        assert time.monotonic() - start >= 1.5 and told == ["retrain flow run R1 (pid 42)"]
    finally:
        stop(holder)
    with project.workspace_lock(tmp_path, "second", 5):  # released when its holder died
        pass
