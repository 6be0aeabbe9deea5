"""Prefect beyond `medtune serve`'s own runs, against one real server on 127.0.0.1 (`medtune server`
on a free port, its own PREFECT_HOME):

- `prefect flow-run ls` / `prefect deployment ls` work with the locked versions (they answered HTTP 422
  with FastAPI >= 0.151, which validates the explicit nulls prefect 3.8.8's client sends);
- `medtune serve`, `retrain --once` and `ingest-new` without PREFECT_API_URL use the server `medtune
  server` started (its address recorded under PREFECT_HOME) instead of a temporary one, and say
  what to do when no server answers;
- each served deployment has a Prefect concurrency limit of 1, and the server holds a second run back;
- the repository's prefect.yaml, deployed with `prefect deploy --all` to a real `process` work pool,
  gives the retrain deployment serve's schedule and event trigger, and a real `prefect worker` runs
  the retrain flow that the event starts (an empty inbox: "nothing new", about a second of flow).

The module's tests share the server and run in file order; each also passes alone. Every process
started here is stopped by its own process id. No assertion on durations.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from tests.workspace import BIN, ROOT, free_port, stop, tool_env

pytestmark = pytest.mark.slow

STARTUP = 120  # s; a generous bound for a loaded 2-core machine, only ever waited out on failure
POOL = "medtune-process"  # prefect.yaml's work pool


def wait_for(what: str, fn, timeout: float = STARTUP, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log.read_text()[-4000:] if log and log.exists() else ""
            raise AssertionError(f"timed out waiting for {what}\n{tail}")
        time.sleep(0.5)


def api_call(api: str, method: str, path: str, body=None):
    """Plain REST on the test server (no Prefect client settings in this process to get wrong).

    Like Prefect's own client, retries a 503: the server's answer when SQLite is busy (the request
    was rolled back), which happens on a loaded machine while the scheduler and a runner write too."""
    for attempt in range(10):
        req = urllib.request.Request(
            f"{api}{path}",
            method=method,
            headers={"content-type": "application/json"},
            data=None if body is None else json.dumps(body).encode(),
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                raw = r.read()
            return json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            if e.code == 503 and attempt < 9:
                time.sleep(0.5 * (attempt + 1))
                continue
            raise AssertionError(f"{method} {path}: HTTP {e.code} {e.read()[:2000]!r}") from e


def deployment(api: str, name: str):
    return api_call(api, "GET", f"/deployments/name/{name}")


def flow_runs(api: str, deployment_id: str) -> list[dict]:
    return (
        api_call(api, "POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}, "limit": 200})
        or []
    )


def run_watched(cmd: list[str], cwd: Path, env: dict, timeout: float = 300) -> tuple[int, str, list[str]]:
    """Run a command to its end: (exit code, its output, the command lines of any Prefect server it
    started). Its process tree is sampled until it exits (a temporary server lives for seconds: its
    start alone takes several); on a timeout the tree is stopped and the test fails."""
    log = cwd / f".run-{uuid.uuid4().hex[:8]}.log"
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    servers: set[str] = set()
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{' '.join(cmd)} still running after {timeout} s:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(psutil.Error):
                servers |= {
                    " ".join(p.cmdline())
                    for p in psutil.Process(proc.pid).children(recursive=True)
                    if is_prefect_server(p)
                }
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            stop(proc, grace=2)
    out = log.read_text()
    log.unlink()
    return proc.returncode, out, sorted(servers)


def is_prefect_server(p: psutil.Process) -> bool:
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return False
    return "prefect.server.api.server" in cmd or ("server" in cmd and "start" in cmd and "prefect" in cmd)


def serve_env(server: dict, **extra: str) -> dict[str, str]:
    """The environment of a user who started `medtune server` and exported no PREFECT_API_URL."""
    env = tool_env(**server["env"], **extra)
    env.pop("PREFECT_API_URL", None)
    return env


def make_checkout(dst: Path) -> Path:
    """A project checkout as a worker sees it (flows, components, params.yaml, prefect.yaml) with an
    empty inbox: a retrain run there is the cheap "nothing new" one. No git or DVC is needed for that."""
    dst.mkdir(parents=True)
    for name in ("flows", "components"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("params.yaml", "prefect.yaml"):
        shutil.copy(ROOT / name, dst / name)
    (dst / "data/inbox").mkdir(parents=True)
    return dst


@pytest.fixture(scope="module")
def server(module_tmp):
    tmp = module_tmp
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {"PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    full = tool_env(**env)
    full.pop("PREFECT_API_URL", None)
    log = tmp / "server.log"
    proc = subprocess.Popen(
        [str(BIN / "medtune"), "server", "--port", str(port)],
        cwd=tmp,
        env=full,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for("the Prefect server", lambda: proc.poll() is not None or _healthy(api), log=log)
        assert proc.poll() is None, log.read_text()[-3000:]
        yield {"api": api, "env": env, "tmp": tmp, "pid": proc.pid}
    finally:
        stop(proc)


def _healthy(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
            return r.read().strip() == b"true"
    except OSError:
        return False


@pytest.fixture(scope="module")
def checkout(server):
    return make_checkout(server["tmp"] / "srv-medtune")


# ---------------------------------------------------------------------------------------------
# The server `medtune server` started is the one used
# ---------------------------------------------------------------------------------------------


def test_serve_uses_the_running_server_with_one_run_per_deployment(server, checkout):
    api = server["api"]
    log = server["tmp"] / "serve.log"
    serve = subprocess.Popen(
        [str(BIN / "medtune"), "serve", "--root", str(checkout)],
        cwd=server["tmp"],
        env=serve_env(server),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        deps = wait_for(
            "both served deployments on the server `medtune server` started",
            lambda: (
                serve.poll() is None
                and all(deployment(api, n) for n in ("medtune-pipeline/pipeline", "medtune-retrain/retrain"))
                and [deployment(api, n) for n in ("medtune-pipeline/pipeline", "medtune-retrain/retrain")]
            ),
            log=log,
        )
        # No second, temporary server next to it.
        assert not [p for p in psutil.Process(serve.pid).children(recursive=True) if is_prefect_server(p)]
        assert f"serving the deployments on the Prefect server at {api}" in log.read_text()
        for dep in deps:
            assert dep["global_concurrency_limit"]["limit"] == 1, dep["name"]
        retrain = deps[1]
        assert retrain["parameters"]["root"] == str(checkout)

        # The limit bites: with one run of the deployment pending, the server holds the next one back.
        # (Scheduled a day ahead, so the runner of `serve` leaves both alone.)
        later = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat()
        runs = [
            api_call(
                api,
                "POST",
                f"/deployments/{retrain['id']}/create_flow_run",
                {"state": {"type": "SCHEDULED", "state_details": {"scheduled_time": later}}},
            )
            for _ in range(2)
        ]
        try:
            first = api_call(
                api, "POST", f"/flow_runs/{runs[0]['id']}/set_state", {"state": {"type": "PENDING", "name": "Pending"}}
            )
            assert first["status"] == "ACCEPT", first
            second = api_call(
                api, "POST", f"/flow_runs/{runs[1]['id']}/set_state", {"state": {"type": "PENDING", "name": "Pending"}}
            )
            assert second["status"] != "ACCEPT" and second["state"]["name"] == "AwaitingConcurrencySlot", second
        finally:
            for run in runs:
                api_call(
                    api,
                    "POST",
                    f"/flow_runs/{run['id']}/set_state",
                    {"state": {"type": "CANCELLED", "name": "Cancelled"}, "force": True},
                )
    finally:
        stop(serve)


def test_retrain_once_and_ingest_new_use_the_running_server(server, checkout):
    api = server["api"]
    env = serve_env(server)
    # A batch to look at (an empty inbox is answered without Prefect): one that names a missing file, so
    # the run quarantines it without training. A run with a batch first checks the registry in git.
    subprocess.run(["git", "init", "-q"], cwd=checkout, check=True)
    bad = checkout / "data" / "inbox" / "batch-missing-file"
    bad.mkdir(parents=True)
    (bad / "labels.csv").write_text("path,label\nmissing.png,normal\n")
    code, out, servers = run_watched(
        [str(BIN / "medtune"), "retrain", "--once", "--root", str(checkout)], server["tmp"], env
    )
    assert code == 0, out
    assert servers == [], servers  # no temporary server of its own
    assert f"View at {api.removesuffix('/api')}/runs/flow-run/" in out, out  # Prefect's link to the run
    lines = out.splitlines()  # the flow's result, printed last as JSON
    result = json.loads("\n".join(lines[max(i for i, line in enumerate(lines) if line == "{") :]))
    assert result["outcome"] == "quarantined", result
    manual = [
        r
        for r in api_call(
            api, "POST", "/flow_runs/filter", {"flows": {"name": {"any_": ["medtune-retrain"]}}, "limit": 200}
        )
        if r["parameters"].get("trigger") == "manual" and r["parameters"].get("root") == str(checkout)
    ]
    assert len(manual) == 1 and manual[0]["state"]["type"] == "COMPLETED", manual

    # ingest-new: the event reaches this server. Another project, so no deployment of `checkout` reacts.
    other = server["tmp"] / "other-project"
    other.mkdir()
    shutil.copy(ROOT / "params.yaml", other / "params.yaml")
    batch = server["tmp"] / "batch-1"
    batch.mkdir()
    (batch / "labels.csv").write_text("path,label\n")
    code, out, servers = run_watched([str(BIN / "medtune"), "ingest-new", str(batch), "--root", str(other)], other, env)
    assert code == 0 and servers == [], out
    assert f"to {api}" in out, out
    from components.retrain.inbox import project_resource

    def events():
        found = api_call(
            api,
            "POST",
            "/events/filter",
            {
                "filter": {
                    "event": {"name": ["medtune.inbox.batch-added"]},
                    "resource": {"id": [project_resource(other)]},
                }
            },
        )
        return found["events"]

    assert wait_for("the batch event on the server", events)[0]["payload"] == {"batch": "batch-1"}


def test_without_a_server_serve_and_ingest_new_say_what_to_do(tmp_path):
    if _healthy("http://127.0.0.1:4200/api"):
        pytest.skip("a Prefect server answers on the default 127.0.0.1:4200, which these commands would use")
    env = tool_env(PREFECT_HOME=str(tmp_path / "prefect-home"), DO_NOT_TRACK="1")
    env.pop("PREFECT_API_URL", None)
    project = make_checkout(tmp_path / "project")
    # Before: serve started a temporary server of its own and served on it until killed.
    code, out, servers = run_watched([str(BIN / "medtune"), "serve"], project, env, timeout=60)
    assert code == 1 and servers == [], out
    assert "no Prefect server answers at http://127.0.0.1:4200/api" in out and "`medtune server`" in out, out
    batch = tmp_path / "batch-2"
    batch.mkdir()
    (batch / "labels.csv").write_text("path,label\n")
    code, out, servers = run_watched([str(BIN / "medtune"), "ingest-new", str(batch)], project, env, timeout=60)
    assert code == 1 and servers == [] and "no event was sent" in out, out
    assert (project / "data/inbox/batch-2/labels.csv").is_file()  # the batch waits for the next run


# ---------------------------------------------------------------------------------------------
# prefect.yaml on a process work pool
# ---------------------------------------------------------------------------------------------


def test_prefect_yaml_deploys_to_a_process_pool_and_a_worker_runs_the_triggered_retrain(server, checkout):
    from components.retrain.inbox import EVENT, project_resource
    from flows.serve import deployments

    api, tmp = server["api"], server["tmp"]
    resource = project_resource(checkout)
    env = tool_env(
        **server["env"], PREFECT_API_URL=api, MEDTUNE_WORKSPACE=str(checkout), MEDTUNE_INBOX_RESOURCE=resource
    )
    out = subprocess.run(
        [str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process"],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # From the checkout's root, as the docs say; the whole prefect.yaml, no prompts.
    out = subprocess.run(
        [str(BIN / "prefect"), "--no-prompt", "deploy", "--all"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr

    # What prefect.yaml made is what `medtune serve` makes, on the work pool.
    pipe, retrain = deployment(api, "medtune-pipeline/pipeline"), deployment(api, "medtune-retrain/retrain")
    served = {d.name: d for d in deployments(checkout)}
    for dep in (pipe, retrain):
        assert dep["work_pool_name"] == POOL and dep["global_concurrency_limit"]["limit"] == 1, dep
        assert dep["entrypoint"] == f"flows/{dep['name']}.py:{dep['name']}"
        assert dep["parameters"] == served[dep["name"]].parameters
        assert dep["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(checkout)}}]
    assert [s["schedule"]["interval"] for s in retrain["schedules"]] == [
        s.schedule.interval.total_seconds() for s in served["retrain"].schedules
    ]
    autos = api_call(api, "GET", f"/automations/related-to/prefect.deployment.{retrain['id']}")
    assert len(autos) == 1, autos
    trigger, want = autos[0]["trigger"], json.loads(served["retrain"].triggers[0].model_dump_json())
    assert trigger["match"] == {"prefect.resource.id": resource} == want["match"]
    assert trigger["expect"] == [EVENT] == want["expect"]
    assert trigger["posture"] == want["posture"] and trigger["threshold"] == want["threshold"]
    assert autos[0]["actions"][0]["parameters"] == want["parameters"]

    # A real process worker runs the run the event starts.
    log = tmp / "worker.log"
    worker = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", POOL],
        cwd=tmp,
        env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        before = {r["id"] for r in flow_runs(api, retrain["id"])}
        api_call(
            api,
            "POST",
            "/events",
            [
                {
                    "id": str(uuid.uuid4()),
                    "occurred": dt.datetime.now(dt.UTC).isoformat(),
                    "event": EVENT,
                    "resource": {"prefect.resource.id": resource},
                    "payload": {"batch": "none (test)"},
                }
            ],
        )

        def finished():
            new = [
                r
                for r in flow_runs(api, retrain["id"])
                if r["id"] not in before
                and r["state"]
                and r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
            ]
            return new or (worker.poll() is not None and [{"state": {"type": f"worker exited {worker.returncode}"}}])

        run = wait_for("the event-triggered retrain run on the worker", finished, log=log)[0]
        assert run["state"]["type"] == "COMPLETED", (run["state"], log.read_text()[-4000:])
        assert run["parameters"]["trigger"] == "event" and run["work_pool_name"] == POOL
        assert "nothing new in data/inbox" in log.read_text()
    finally:
        stop(worker)


def test_prefect_cli_lists_runs_and_deployments(server):
    env = tool_env(**server["env"], PREFECT_API_URL=server["api"], COLUMNS="200")
    for what in ("flow-run", "deployment"):
        out = subprocess.run(
            [str(BIN / "prefect"), what, "ls"], cwd=server["tmp"], env=env, capture_output=True, text=True, timeout=120
        )
        # An API mismatch shows as an HTTP 422 (Unprocessable Entity) from the server.
        assert out.returncode == 0 and "422 Unprocessable" not in out.stdout + out.stderr, out.stdout + out.stderr
