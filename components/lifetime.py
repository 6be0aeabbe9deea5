"""A stage process dies with whoever started it, and one stage runs at a time per project.

Two faults this prevents:

1. Orphans. `kill -9` of `dvc repro` during training used to leave `medtune train` running; the
   next `dvc repro` started a second training and both wrote models/model.pt. Now every stage
   process asks the kernel for SIGKILL when its parent dies (Linux prctl PR_SET_PDEATHSIG), and so
   does every process a medtune process starts through this module (`python -m components.lifetime
   --parent PID MODULE ARGS`): torchrun and its workers, the temporary Prefect server of
   `medtune retrain --once`. Off Linux all of this is a no-op.
2. Two writers. A stage holds an exclusive lock for its whole run (`stage_lock`); a second
   `medtune <stage>` in the same project refuses to start and names the holder.

How DVC 3 runs a stage command (dvc/stage/run.py): `$SHELL -c "<cmd>"` ($SHELL unset: /bin/sh),
not through subprocess's shell=True, with DVC_ROOT and DVC_STAGE in the environment. bash execs a
lone simple command, so medtune's parent is dvc itself. dash (Debian's /bin/sh, so every
environment without SHELL: containers, cron, CI) does not, and no shell does for a compound
command (`a && b`): the shell stays between dvc and medtune, and it does not die with dvc, so the
parent-death signal alone would never fire. `die_with_starter` therefore also finds the nearest
ancestor above such `-c` shells (the process that really started the stage) and watches it from a
daemon thread; when it is gone the stage kills itself. A thread rather than, say, an intermediate
watchdog process: nothing to start or clean up, and it cannot outlive the stage it watches.

SIGKILL rather than SIGTERM everywhere: it cannot be caught, ignored or delayed by a busy handler
(torchrun and uvicorn install their own), every artefact is written atomically (components.common),
and the stage lock is an OS lock the kernel releases with the process.
"""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from components.common import StageError

# The parent-death signal is Linux's; elsewhere every function here that uses it does nothing.
SUPPORTED = sys.platform.startswith("linux")
# Set by the wrapper for the processes it starts without --parent (torchrun's workers, whose
# parent pid is not known when their command line is written): "your parent is this pid".
PARENT_ENV = "MEDTUNE_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Shells that run `-c STRING` and then only wait for the command: they stay alive while it runs
# and are no reason to keep it alive.
_SHELLS = frozenset({"sh", "dash", "ash", "bash", "zsh", "ksh", "mksh", "ksh93", "fish", "tcsh", "csh", "busybox"})
WATCH_INTERVAL = 1.0  # seconds between two looks at the watched ancestor


class ParentGone(StageError):
    """The process that started this one died before it could be bound to it."""


class StageBusy(StageError):
    """Another live process is running the same stage in the same project."""


# ---------------------------------------------------------------------------------------------
# Parent death
# ---------------------------------------------------------------------------------------------


def _set_pdeathsig(sig: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, sig); False (with a warning) if the kernel refuses, e.g. a seccomp filter."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0:
        return True
    err = ctypes.get_errno()
    print(
        f"warning: prctl(PR_SET_PDEATHSIG) failed ({os.strerror(err)}); this process will not stop "
        "by itself if the process that started it dies.",
        file=sys.stderr,
    )
    return False


def die_with_parent(what: str, expected_parent: int | None = None) -> None:
    """Get SIGKILL when the parent dies; ParentGone if it is already gone.

    `expected_parent`: the pid that started this process, when the starter passed it (exact). Without
    it, the parent read just before prctl stands in for it, which catches a parent that dies between
    the two calls; one that died earlier, while the interpreter started, is caught by
    `die_with_starter` for processes DVC started, and otherwise goes unnoticed (a limit of Linux:
    the original parent of a reparented process is not recorded anywhere).

    Note: the kernel sends the signal when the parent *thread* that forked this process exits, so a
    starter must start it from a thread that outlives it (launch() and the server do: they wait in
    the starting thread, or start from the main thread).
    """
    if not SUPPORTED:
        return
    before = os.getppid() if expected_parent is None else expected_parent
    if not _set_pdeathsig(signal.SIGKILL):
        return
    now = os.getppid()
    if now != before:
        raise ParentGone(
            f"{what}: the process that started it (pid {before}) is already gone (its parent is now "
            f"pid {now}); not running on as an orphan. Start it again if it is still wanted."
        )


def _alive(proc) -> bool:
    """psutil.Process still running (same pid *and* start time, so not a reused pid) and not a zombie:
    a killed process stays a zombie until its own parent reaps it, but it is gone for our purpose."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _runs_a_command_string(proc) -> bool:
    """A shell started as `sh -c STRING` (also `-ec`, `--norc -c`, ...): it only waits for its command."""
    import psutil

    try:
        name = proc.name()
        args = proc.cmdline()
    except psutil.Error:
        return False
    return (name in _SHELLS or os.path.basename(args[0] if args else "") in _SHELLS) and any(
        a.startswith("-") and not a.startswith("--") and "c" in a[1:] for a in args[1:]
    )


def _looks_like_dvc(proc) -> bool:
    import psutil

    try:
        args = proc.cmdline()
    except psutil.Error:
        return True  # cannot tell (e.g. /proc mounted hidepid): assume it is
    return any(os.path.basename(a) == "dvc" for a in args)


def _starter():
    """The nearest ancestor that is not a `-c` shell: the process that really started this one."""
    import psutil

    try:
        proc = psutil.Process(os.getppid())
        while _runs_a_command_string(proc):
            up = proc.parent()
            if up is None:
                break
            proc = up
        return proc
    except psutil.Error:
        return None


def die_with_starter(what: str) -> None:
    """For a stage process (`medtune <stage>`): die with the parent, and with the starter above it.

    The parent-death signal covers the parent. When shells sit between the starter (dvc) and this
    process (dash's `sh -c`, a compound command), a daemon thread also watches the starter and kills
    this process when it is gone; the shells then end on their own.
    ParentGone if the parent or the starter is already gone.
    """
    if not SUPPORTED:
        return
    die_with_parent(what)
    starter = _starter()
    if starter is None:
        return
    if os.environ.get("DVC_STAGE") and starter.pid == 1 and not _looks_like_dvc(starter):
        # DVC started this stage (DVC_STAGE), yet the nearest non-shell ancestor is init: dvc died
        # before this process could bind to it, and init adopted what it left.
        raise ParentGone(
            f"{what}: started by dvc (stage {os.environ['DVC_STAGE']}), but dvc is already gone (this "
            "process now belongs to pid 1); not running on as an orphan. Run `dvc repro` again."
        )
    if starter.pid == os.getppid():
        return  # the parent-death signal covers it
    if not _alive(starter):
        raise ParentGone(
            f"{what}: the process that started it through a shell (pid {starter.pid}) is already "
            "gone; not running on as an orphan. Start it again if it is still wanted."
        )
    threading.Thread(target=_watch, args=(starter, what), name="medtune-watch-starter", daemon=True).start()


def _watch(starter, what: str) -> None:
    try:
        desc = f"{starter.name()} (pid {starter.pid})"
    except Exception:  # noqa: BLE001 - only for the message
        desc = f"pid {starter.pid}"
    while _alive(starter):
        time.sleep(WATCH_INTERVAL)
    try:
        print(f"{what}: {desc}, which started it, is gone; stopping.", file=sys.stderr, flush=True)
    except Exception:  # noqa: BLE001 - stderr may be gone with it; stop anyway
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def module_argv(module: str, args: Sequence[str], parent: int | None = None) -> list[str]:
    """What follows `python -m` to run `python -m module args` as a process that dies with `parent`
    (default: this process). Start it from a thread that waits for it (see die_with_parent)."""
    return [__name__, "--parent", str(os.getpid() if parent is None else parent), module, *args]


def _wrapper_main(argv: list[str]) -> int:
    """`python -m components.lifetime [--parent PID] MODULE ARGS...`: bind to the parent, then run
    MODULE as __main__ in this same process (no second interpreter; the pid the starter knows is the
    module's). Without --parent the expected parent comes from MEDTUNE_PARENT_PID, which this wrapper
    sets for its own children, so torchrun's workers bind exactly to torchrun."""
    parent = None
    if argv[:1] == ["--parent"] and len(argv) >= 2:
        parent, argv = int(argv[1]), argv[2:]
    elif os.environ.get(PARENT_ENV, "").isdigit():
        parent = int(os.environ[PARENT_ENV])
    os.environ.pop(PARENT_ENV, None)
    if not argv:
        print("usage: python -m components.lifetime [--parent PID] MODULE [ARGS...]", file=sys.stderr)
        return 2
    module, args = argv[0], argv[1:]
    try:
        die_with_parent(f"python -m {module}", parent)
    except ParentGone as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    os.environ[PARENT_ENV] = str(os.getpid())
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


# ---------------------------------------------------------------------------------------------
# One writer per stage
# ---------------------------------------------------------------------------------------------


def lock_path(stage: str, root: str | Path = ".") -> Path:
    """Where the lock of `stage` lives: .dvc/tmp/ (git-ignored by DVC) in a DVC project, else a folder
    in the temp dir keyed by the project's path (nothing written among the outputs)."""
    root = Path(root).resolve()
    if (root / ".dvc").is_dir():
        return root / ".dvc" / "tmp" / f"medtune-stage-{stage}.lock"
    key = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"medtune-locks-{key}" / f"stage-{stage}.lock"


def stage_outputs(stage: str, root: str | Path = ".") -> list[str]:
    """The outputs dvc.yaml declares for `stage` (outs, metrics, plots); [] without a dvc.yaml."""
    import yaml

    try:
        spec = (yaml.safe_load((Path(root) / "dvc.yaml").read_text()) or {}).get("stages", {}).get(stage) or {}
    except (OSError, yaml.YAMLError):
        return []
    return [
        next(iter(o)) if isinstance(o, dict) else str(o)
        for key in ("outs", "metrics", "plots")
        for o in spec.get(key) or []
    ]


def _holder(path: Path) -> dict:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


@contextmanager
def stage_lock(stage: str, root: str | Path = ".", command: str | None = None) -> Iterator[Path]:
    """Hold `stage`'s lock in the project at `root` for the block; StageBusy at once if a live process
    holds it. An OS file lock (filelock): the kernel drops it when the holder dies, however it dies,
    so a crash never leaves it stuck. The holder's pid and command are written into the lock file."""
    from filelock import FileLock, Timeout

    path = lock_path(stage, root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StageError(
            f"stage {stage}: cannot create the folder of its lock {path.parent}: {exc}; expected a "
            "writable folder (the project's .dvc/tmp or the temp dir)."
        ) from exc
    me = {
        "pid": os.getpid(),
        "command": command or f"medtune {stage}",
        "root": str(Path(root).resolve()),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    def record(fd: int) -> None:
        # A contender opens the file without truncating it (filelock), so this stays readable.
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)

    lock = FileLock(path, blocking=False, on_acquired=record)
    try:
        lock.acquire()
    except Timeout:
        raise StageBusy(_busy_message(stage, root, path)) from None
    try:
        yield path
    finally:
        lock.release()


def _busy_message(stage: str, root: str | Path, path: Path) -> str:
    info = _holder(path)
    pid = info.get("pid")
    who = f"pid {pid} ({info.get('command', '?')}, since {info.get('since', '?')})" if pid else "another process"
    outs = ", ".join(stage_outputs(stage, root)) or "its outputs"
    stop = f"stop it (kill {pid})" if pid else f"stop the process holding {path}"
    return (
        f"stage {stage} is already running in {Path(root).resolve()}: {who} holds {path} and writes {outs}; "
        f"not starting a second writer. Wait for it to finish, or {stop}, then run this again."
    )


if __name__ == "__main__":
    raise SystemExit(_wrapper_main(sys.argv[1:]))
