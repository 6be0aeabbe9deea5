"""The Prefect commands: a local server, the served deployments, one run now, a batch into the inbox.

    medtune server                    # local Prefect server (UI) on 127.0.0.1:4200
    medtune serve                     # serve the deployments: pipeline on demand, retrain on schedule + event
    medtune retrain --once            # one retrain run now (trigger "manual")
    medtune pipeline                  # one pipeline flow run now, in this process
    medtune ingest-new PATH           # put a labelled batch into the inbox and emit the retrain event

Run them from the project root. `serve`, `retrain` and `ingest-new` talk to the server named by
PREFECT_API_URL (environment or Prefect profile); without one, to the server `medtune server` started
(flows/prefect_server.py): the address it recorded under PREFECT_HOME, else http://127.0.0.1:4200/api,
if it answers. Only `retrain --once` starts a temporary server of its own when none answers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from components import common
from components.common import StageError
from components.retrain.stages import OUTCOMES, check_params_file
from components.templates import format_table
from flows.prefect_server import DEFAULT_API, prefect_api, running_server, server_record

QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    # What the flows call in-process (inbox, registry) logs to "medtune.*"; this shows those lines
    # in the Prefect UI too. The stages' own lines come through run_stage.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "medtune",
}


def quiet_env() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def _api_url() -> str:
    return os.environ.get("PREFECT_API_URL") or DEFAULT_API


def cmd_server(args: argparse.Namespace) -> None:
    quiet_env()
    exe = Path(sys.executable).parent / "prefect"
    argv = [str(exe) if exe.is_file() else "prefect", "server", "start", "--host", args.host, "--port", str(args.port)]
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    api = f"http://{host}:{args.port}/api"
    print(f"Prefect server on http://{args.host}:{args.port} (API: {api})", flush=True)
    # For `medtune serve`, `retrain` and `ingest-new` without PREFECT_API_URL (running_server); a stale
    # record is harmless: they use it only while a server answers there.
    record = server_record()
    with contextlib.suppress(OSError):
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"api": api, "pid": os.getpid()}) + "\n")
    # exec: the server keeps this process id, so whoever started it can stop it by that id.
    os.execve(argv[0], argv, os.environ.copy())


def cmd_serve(args: argparse.Namespace) -> None:
    quiet_env()
    # The runner looks for due runs every 10 s by default; 2 s makes an event-triggered retrain start
    # within seconds of `medtune ingest-new`, for one cheap query per 2 s.
    os.environ.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "2")
    url = running_server()  # also makes Prefect see the two lines above
    if url is None:
        raise StageError(
            f"serve: no Prefect server answers at {DEFAULT_API} (nor where `medtune server` last "
            "recorded it) and PREFECT_API_URL is not set. Start one first, `medtune server` (in another "
            "terminal, or `medtune server &`), or set PREFECT_API_URL to the server to use."
        )
    print(f"serving the deployments on the Prefect server at {url}", flush=True)
    from flows.serve import serve_deployments

    serve_deployments(Path(args.root).resolve(), args.params)


def cmd_retrain(args: argparse.Namespace) -> None:
    quiet_env()
    if not args.once:
        raise StageError(
            "retrain: pass --once to run one retrain now; `medtune serve` runs it on schedule and on events."
        )
    if _nothing_to_retrain(Path(args.root).resolve(), args.params):
        return
    from flows.retrain import retrain

    with prefect_api():
        try:
            result = retrain(root=str(Path(args.root).resolve()), params=args.params, trigger="manual")
        finally:
            _drain_logs()
    print(json.dumps(result, indent=2, sort_keys=True, default=str))


def _nothing_to_retrain(root: Path, params: str) -> bool:
    """The flow's first check (same params check, same listing, same pending release), made before
    Prefect is imported or a temporary server started: an empty inbox costs a fraction of a second,
    not a server's start and stop. Says so, and prints the result the flow would have returned."""
    from components.params import load_params
    from components.retrain.inbox_listing import find_batches
    from components.retrain.promote import pending

    check_params_file(root, params)
    inbox_dir = load_params(root / params).retrain.inbox_dir
    if find_batches(root / inbox_dir) or pending(root):
        return False
    print(f"inbox {inbox_dir}: no new batches; nothing to do", file=sys.stderr)
    print(json.dumps({"outcome": "nothing-new", "trigger": "manual"}, indent=2, sort_keys=True))
    return True


def _drain_logs() -> None:
    """Send the run's last log lines (a stage's error among them) to the API before a temporary
    server stops with prefect_api's block, or they are lost with an "Error logging to API"."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=15)


def cmd_pipeline(args: argparse.Namespace) -> None:
    """One pipeline flow run in this process, like `retrain --once`: each stage is `dvc repro --single-item`."""
    quiet_env()
    from flows.pipeline import on_cluster, pipeline

    root = Path(args.root).resolve()
    with prefect_api():
        try:  # on a Dask cluster when one is configured (flows.pipeline.task_runner)
            result = on_cluster(pipeline, root / args.params)(root=str(root), params=args.params)
        finally:
            _drain_logs()
    if result["stages"]:
        print(
            format_table((stage, OUTCOMES.get(outcome, outcome)) for stage, outcome in result["stages"].items()),
            file=sys.stderr,
        )
    print(json.dumps(result, indent=2, sort_keys=True, default=str))
    if "gate-failed" in result["stages"].values():  # as `dvc repro` fails at export: no model this run
        raise StageError("the model failed the gate and was not exported; see reports/gate.json")


def cmd_ingest_new(args: argparse.Namespace) -> None:
    quiet_env()
    from components.params import load_params
    from components.retrain.inbox import EVENT, add_to_inbox

    root = Path(args.root).resolve()
    rp = load_params(root / args.params).retrain
    batch = add_to_inbox(args.path, root / rp.inbox_dir, args.name)
    print(f"batch {batch.name} is in the inbox: {batch}")
    if args.no_event:
        print("no event emitted (--no-event): the next scheduled retrain run picks it up.")
        return
    emit_batch_event(root, batch.name)
    print(f"emitted {EVENT} to {_api_url()}: a served retrain deployment starts within seconds.")


def emit_batch_event(root: Path, batch_name: str) -> None:
    if running_server() is None:
        raise StageError(
            f"no Prefect server answers at {DEFAULT_API} (nor where `medtune server` last recorded it) "
            "and PREFECT_API_URL is not set, so no event was sent: the batch stays in the inbox for "
            "the next scheduled run. Start `medtune server` and `medtune serve`, or run "
            "`medtune retrain --once` now."
        )
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    from components.retrain.inbox import EVENT, project_resource

    event = emit_event(
        EVENT,
        resource={"prefect.resource.id": project_resource(root), "prefect.resource.name": root.name},
        payload={"batch": batch_name},
    )
    if event is None:
        raise StageError(
            f"could not emit {EVENT}: Prefect events are disabled or no API is configured "
            f"(PREFECT_API_URL={_api_url()}); the batch stays in the inbox for the scheduled run."
        )
    EventsWorker.drain_all(timeout=15)  # a short-lived CLI: send before the process exits


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=".", help="project root (default: the current folder)")
    p.add_argument(
        "--params", default="params.yaml", help="parameters, including the `retrain:` section (default: params.yaml)"
    )


def _run(
    command: str,
    description: str,
    add_args: Callable[[argparse.ArgumentParser], None],
    func: Callable[[argparse.Namespace], None],
    argv: Sequence[str] | None,
) -> int:
    # `--params` comes from _common (server has none), so stage_main must not add its own.
    return common.stage_main(description, add_args, func, argv, prog=f"medtune {command}", params_flag=False)


# One `<command>_main(argv)` per command (components/cli.py's COMMANDS). `retrain_main` answers an
# empty inbox before Prefect is imported.
def server_main(argv: Sequence[str] | None = None) -> int:
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, this machine only)")
        p.add_argument("--port", type=int, default=4200, help="port (default: 4200)")

    return _run("server", "Start a local Prefect server (API and UI).", add, cmd_server, argv)


def serve_main(argv: Sequence[str] | None = None) -> int:
    return _run(
        "serve",
        "Serve the deployments: medtune-pipeline on demand, medtune-retrain on its schedule "
        "and on the inbox event. Runs until killed.",
        _common,
        cmd_serve,
        argv,
    )


def retrain_main(argv: Sequence[str] | None = None) -> int:
    def add(p: argparse.ArgumentParser) -> None:
        _common(p)
        p.add_argument("--once", action="store_true", help="run one retrain now (trigger 'manual') and exit")

    return _run(
        "retrain",
        "Retrain on new labelled batches in the inbox (champion/challenger promotion).",
        add,
        cmd_retrain,
        argv,
    )


def pipeline_main(argv: Sequence[str] | None = None) -> int:
    return _run(
        "pipeline",
        "Run the pipeline once as a Prefect flow: one task per dvc.yaml stage, each "
        "`dvc repro --single-item STAGE` (unchanged stages are skipped; DVC writes dvc.lock).",
        _common,
        cmd_pipeline,
        argv,
    )


def ingest_new_main(argv: Sequence[str] | None = None) -> int:
    def add(p: argparse.ArgumentParser) -> None:
        _common(p)
        p.add_argument("path", help="batch folder: class sub-folders, or files plus labels.csv")
        p.add_argument("--name", default=None, help="batch name in the inbox (default: the folder's name)")
        p.add_argument("--no-event", action="store_true", help="only copy; let the scheduled run find it")

    return _run(
        "ingest-new",
        "Copy a labelled batch into the inbox (atomically) and emit the retrain event.",
        add,
        cmd_ingest_new,
        argv,
    )
