"""Orchestration glue: run a stage in-process, the workspace lock, and the Prefect commands.

    medtune server                    # local Prefect server (UI) on 127.0.0.1:4200
    medtune serve                     # serve the deployments: pipeline on demand, retrain on schedule + event
    medtune retrain --once            # one retrain run now (trigger "manual")
    medtune ingest-new PATH           # put a labelled batch into the inbox and emit the retrain event

Run them from the project root. `serve`, `retrain` and `ingest-new` talk to the server named by
PREFECT_API_URL (default here: http://127.0.0.1:4200/api, the one `medtune server` starts).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from components import common
from components.common import StageError

log = logging.getLogger("medtune.orchestrate")

STAGES = ("ingest", "validate", "preprocess", "augment", "train", "evaluate", "export")
DEFAULT_API = "http://127.0.0.1:4200/api"
QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1",
             # Stage modules log to "medtune.*"; this shows those lines in the Prefect UI too.
             "PREFECT_LOGGING_EXTRA_LOGGERS": "medtune"}


def quiet_env() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s: str) -> int:
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self) -> None:
        for st in self.streams:
            st.flush()


def run_stage(stage: str, params_path: str | Path = "params.yaml") -> None:
    """Call `components.<stage>.main(["--params", ...])`, exactly what `medtune <stage>` (dvc.yaml) runs.

    A non-zero exit becomes a StageError carrying the stage's own error line. Working directory:
    the project root (the stage's default paths are relative to it).
    """
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is unknown; expected one of {list(STAGES)}.")
    module = importlib.import_module(f"components.{stage}")
    captured = io.StringIO()
    with contextlib.redirect_stderr(_Tee(sys.stderr, captured)):
        code = module.main(["--params", str(params_path)])
    if code:
        lines = [ln for ln in captured.getvalue().splitlines() if ln.startswith("error:")]
        raise StageError(f"stage {stage} failed (exit {code}): "
                         f"{lines[-1].removeprefix('error: ') if lines else 'see the log above'}")


def is_transient(exc: BaseException | None) -> bool:
    """Worth a retry: I/O trouble (disk, NFS, a DVC lock), never a StageError/ValueError (bad input)."""
    return isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, StageError))


@contextlib.contextmanager
def workspace_lock(root: str | Path, holder: str, timeout: float,
                   on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Exclusive lock on the project workspace (one retrain/pipeline run, so one DVC command, at a time).

    An OS file lock: released by the kernel if the holder dies, so a crash never leaves it stuck.
    Waits up to `timeout` seconds (calling on_wait once with the holder's description), then raises.
    """
    path = Path(root) / ".dvc" / "tmp" / "medtune-workspace.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        deadline, told = time.monotonic() + timeout, False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told and on_wait:
                    fh.seek(0)
                    on_wait(fh.read().strip() or "another process")
                    told = True
                if time.monotonic() > deadline:
                    fh.seek(0)
                    raise StageError(f"{path}: held by {fh.read().strip() or 'another process'} for more than "
                                     f"{timeout:.0f} s; not starting a second run in the same workspace.")
                time.sleep(0.5)
        fh.seek(0)
        fh.truncate()
        fh.write(holder)
        fh.flush()
        yield
    finally:
        fh.close()  # closing releases the lock


def project_resource(root: str | Path) -> str:
    """Prefect resource id of this project's inbox (so two projects on one server do not cross-trigger)."""
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:12]
    return f"medtune.inbox.{digest}"


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

def _api_url() -> str:
    return os.environ.get("PREFECT_API_URL") or DEFAULT_API


def cmd_server(args: argparse.Namespace) -> None:
    quiet_env()
    exe = Path(sys.executable).parent / "prefect"
    argv = [str(exe) if exe.is_file() else "prefect", "server", "start", "--host", args.host, "--port", str(args.port)]
    print(f"Prefect server on http://{args.host}:{args.port} (API: http://{args.host}:{args.port}/api)", flush=True)
    # exec: the server keeps this process id, so whoever started it can stop it by that id.
    os.execve(argv[0], argv, os.environ.copy())


def cmd_serve(args: argparse.Namespace) -> None:
    quiet_env()
    os.environ.setdefault("PREFECT_API_URL", DEFAULT_API)
    # The runner looks for due runs every 10 s by default; 2 s makes an event-triggered retrain start
    # within seconds of `medtune ingest-new`, for one cheap query per 2 s.
    os.environ.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "2")
    from flows.serve import serve_deployments

    serve_deployments(Path(args.root).resolve(), args.params, args.retrain_params)


def cmd_retrain(args: argparse.Namespace) -> None:
    quiet_env()
    if not args.once:
        raise StageError("retrain: pass --once to run one retrain now; `medtune serve` runs it on schedule and on events.")
    from flows.retrain import retrain

    result = retrain(root=str(Path(args.root).resolve()), params=args.params,
                     retrain_params=args.retrain_params, trigger="manual")
    print(json.dumps(result, indent=2, sort_keys=True, default=str))


def cmd_ingest_new(args: argparse.Namespace) -> None:
    quiet_env()
    from components.inbox import EVENT, add_to_inbox, load_retrain_params

    root = Path(args.root).resolve()
    rp = load_retrain_params(root / (args.retrain_params or args.params))
    batch = add_to_inbox(args.path, root / rp.inbox_dir, args.name)
    print(f"batch {batch.name} is in the inbox: {batch}")
    if args.no_event:
        print("no event emitted (--no-event): the next scheduled retrain run picks it up.")
        return
    emit_batch_event(root, batch.name)
    print(f"emitted {EVENT} to {_api_url()}: a served retrain deployment starts within seconds.")


def emit_batch_event(root: Path, batch_name: str) -> None:
    os.environ.setdefault("PREFECT_API_URL", DEFAULT_API)
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    from components.inbox import EVENT

    event = emit_event(EVENT, resource={"prefect.resource.id": project_resource(root),
                                        "prefect.resource.name": root.name},
                       payload={"batch": batch_name})
    if event is None:
        raise StageError(f"could not emit {EVENT}: Prefect events are disabled or no API is configured "
                         f"(PREFECT_API_URL={_api_url()}); the batch stays in the inbox for the scheduled run.")
    EventsWorker.drain_all(timeout=15)  # a short-lived CLI: send before the process exits


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=".", help="project root (default: the current folder)")
    p.add_argument("--params", default="params.yaml", help="pipeline parameters (default: params.yaml)")
    p.add_argument("--retrain-params", default=None,
                   help="file with the `retrain:` section (default: the --params file)")


def _run(command: str, description: str, add_args: Callable[[argparse.ArgumentParser], None],
         func: Callable[[argparse.Namespace], None], argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog=f"medtune {command}", description=description)
    add_args(parser)
    args = parser.parse_args(argv)
    common.setup_logging()
    try:
        func(args)
    except (StageError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


# One `main(argv)` per command; cli.py maps `medtune server` to this module's `main`, `serve` and
# `retrain` to flows.serve / flows.retrain, `ingest-new` to components.inbox (each calls these).
def server_main(argv: Sequence[str] | None = None) -> int:
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, this machine only)")
        p.add_argument("--port", type=int, default=4200, help="port (default: 4200)")
    return _run("server", "Start a local Prefect server (API and UI).", add, cmd_server, argv)


def serve_main(argv: Sequence[str] | None = None) -> int:
    return _run("serve", "Serve the deployments: medtune-pipeline on demand, medtune-retrain on its schedule "
                "and on the inbox event. Runs until killed.", _common, cmd_serve, argv)


def retrain_main(argv: Sequence[str] | None = None) -> int:
    def add(p: argparse.ArgumentParser) -> None:
        _common(p)
        p.add_argument("--once", action="store_true", help="run one retrain now (trigger 'manual') and exit")
    return _run("retrain", "Retrain on new labelled batches in the inbox (champion/challenger promotion).",
                add, cmd_retrain, argv)


def ingest_new_main(argv: Sequence[str] | None = None) -> int:
    def add(p: argparse.ArgumentParser) -> None:
        _common(p)
        p.add_argument("path", help="batch folder: class sub-folders, or files plus labels.csv")
        p.add_argument("--name", default=None, help="batch name in the inbox (default: the folder's name)")
        p.add_argument("--no-event", action="store_true", help="only copy; let the scheduled run find it")
    return _run("ingest-new", "Copy a labelled batch into the inbox (atomically) and emit the retrain event.",
                add, cmd_ingest_new, argv)


main = server_main


if __name__ == "__main__":
    raise SystemExit(main())
