"""Orchestration glue: the stages run by DVC (`dvc repro --single-item`), the workspace lock, and the Prefect commands.

    medtune server                    # local Prefect server (UI) on 127.0.0.1:4200
    medtune serve                     # serve the deployments: pipeline on demand, retrain on schedule + event
    medtune retrain --once            # one retrain run now (trigger "manual")
    medtune ingest-new PATH           # put a labelled batch into the inbox and emit the retrain event

Run them from the project root. `serve`, `retrain` and `ingest-new` talk to the server named by
PREFECT_API_URL (environment or Prefect profile); without one, to the server `medtune server` started
(`running_server`): the address it recorded under PREFECT_HOME, else http://127.0.0.1:4200/api, if it
answers. Only `retrain --once` starts a temporary server of its own when none answers.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components import common, lifetime
from components.common import StageError

log = logging.getLogger("medtune.orchestrate")

DEFAULT_API = "http://127.0.0.1:4200/api"
QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1",
             # What the flows call in-process (inbox, registry) logs to "medtune.*"; this shows those lines
             # in the Prefect UI too. The stages' own lines come through run_stage.
             "PREFECT_LOGGING_EXTRA_LOGGERS": "medtune"}


def quiet_env() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


# ---------------------------------------------------------------------------------------------
# The stages: dvc.yaml's, run by DVC
# ---------------------------------------------------------------------------------------------

GATE_FILE = "reports/gate.json"  # evaluate's decision; a stage that reads it (export) runs only if it passed


@dataclass(frozen=True)
class PipelineStage:
    """One dvc.yaml stage as DVC reads it (interpolation resolved)."""
    name: str               # what `dvc repro` in the root takes: "train" ("sub/dvc.yaml:train" for a nested dvc.yaml)
    deps: tuple[str, ...]   # dependency paths relative to the project root
    outs: tuple[str, ...]   # outs, metrics and plots, relative to the project root


def pipeline_stages(root: str | Path = ".") -> list[PipelineStage]:
    """The dvc.yaml stages in the order `dvc repro` runs them: DVC's own graph and plan
    (dvc.repo.reproduce.plan_repro), so dvc.yaml is the only list of stages. `.dvc` files (data/raw.dvc)
    are data sources, not stages: the pipeline flow versions the raw folder itself (`dvc add`)."""
    from dvc.repo import Repo
    from dvc.repo.reproduce import plan_repro
    from dvc.stage import PipelineStage as DvcPipelineStage

    root = Path(root).resolve()

    def rel(path: str) -> str:
        try:
            return Path(path).resolve().relative_to(root).as_posix()
        except ValueError:  # outside the project (an absolute dep): keep it as DVC has it
            return str(path)

    def address(st: DvcPipelineStage) -> str:
        # What `dvc repro` takes in the root (DVC's own `addressing` is relative to this process's cwd).
        dvcfile = rel(st.path)
        return st.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{st.name}"

    with Repo(str(root)) as repo:
        return [PipelineStage(address(st), tuple(rel(d.fs_path) for d in st.deps), tuple(rel(o.fs_path) for o in st.outs))
                for st in plan_repro(repo.index.graph) if isinstance(st, DvcPipelineStage)]


class TransientStageError(StageError):
    """A stage failed on something a retry may get past: DVC's lock held by another DVC command in the
    workspace, or an OSError (other than a missing file) raised in the stage."""


@dataclass
class StageRun:
    stage: str
    outcome: str            # "ran" | "skipped" (unchanged) | "run-cache" (restored, not run) | "unknown"
    lines: list[str]        # everything dvc and the stage printed, in order


# Each outcome in words: the message of the pipeline flow's task state and of `medtune pipeline`.
OUTCOMES = {"ran": "ran", "skipped": "skipped: unchanged since dvc.lock",
            "run-cache": "skipped: outputs restored from DVC's run cache, not run",
            "gate-failed": "not run: the gate failed, so no model this run (reports/gate.json)",
            "unknown": "finished, but DVC's output did not say whether it ran (see the log)"}


# What DVC 3 logs for each outcome of `dvc repro --single-item STAGE` (dvc/stage/run.py,
# dvc/stage/__init__.py, dvc/stage/cache.py). Its English is the only place DVC says which it was;
# tests/test_orchestrate.py and tests/test_flows.py fail if a DVC upgrade changes it.
_DVC_SAYS = {"ran": "Running stage '{}':", "skipped": "Stage '{}' didn't change, skipping",
             "run-cache": "Stage '{}' is cached - skipping run, checking out outputs"}
# A stage's own log record (common.setup_logging): "2026-01-02 03:04:05,678 WARNING medtune.ingest: ...".
_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) (.*)$")
_RECORD_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?:DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def _pieces(line: str) -> list[str]:
    """A line, split where a log record starts in its middle: a progress bar (tqdm) ends without a
    newline, so the record logged after it lands on the bar's line."""
    cuts = [m.start() for m in _RECORD_START.finditer(line) if m.start() > 0]
    return [line[a:b] for a, b in zip([0, *cuts], [*cuts, len(line)])]


def _level(line: str) -> tuple[int, str]:
    m = _RECORD.match(line)
    if m:  # the stage's timestamp is dropped: the run logger adds its own
        return logging.getLevelName(m.group(1)), m.group(2)
    if line.startswith(("error: ", "ERROR: ")):  # the stage's one-line error; DVC's summary
        return logging.ERROR, line
    if line.startswith(("warning: ", "WARNING: ")):
        return logging.WARNING, line
    return logging.INFO, line


def _raised(lines: list[str]) -> str | None:
    """The exception line ("OSError: [Errno 5] ...") of the last Python traceback in the output."""
    last = None
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            last = next((x for x in lines[i + 1:] if x and not x[0].isspace()), None)
    return last


def _stage_error(lines: list[str]) -> str:
    """The stage's own error message (`error: ...`, possibly several lines, e.g. the failed validation
    checks), without DVC's summary after it; else the exception a traceback ended with, and DVC's
    `ERROR:` lines."""
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    if starts:
        body = []
        for line in lines[starts[-1]:]:
            if line.startswith("ERROR: "):
                break
            body.append(line)
        return "\n".join(body)[len("error: "):].strip()
    said = [x for x in [_raised(lines)] if x] + [line[len("ERROR: "):] for line in lines if line.startswith("ERROR: ")]
    return "; ".join(said) or "\n".join(lines[-10:]).strip() or "no output"


def _transient_output(lines: list[str]) -> bool:
    """DVC's lock was busy, or the stage died of an OSError other than a missing file (its traceback's last line)."""
    if any(line.startswith("ERROR: ") and "Unable to acquire lock" in line for line in lines):
        return True
    last = _raised(lines)
    if not last or ":" not in last:
        return False
    cls = getattr(builtins, last.split(":", 1)[0].rsplit(".", 1)[-1], None)
    return isinstance(cls, type) and issubclass(cls, OSError) and not issubclass(cls, FileNotFoundError)


def run_stage(stage: str, root: str | Path = ".", logger: logging.Logger | logging.LoggerAdapter | None = None) -> StageRun:
    """`dvc repro --single-item STAGE` in the project at `root`: DVC decides whether the stage runs, is
    skipped (unchanged since dvc.lock) or is restored from its run cache, and DVC writes dvc.lock.

    Every line dvc and the stage print goes to `logger` as it comes (a Prefect task's run logger puts
    it in the flow run's logs on the server), at the level of the stage's own log record. The dvc
    process dies with this one (components.lifetime), and the stage with dvc. A failure raises
    StageError with the stage's own error message (TransientStageError when a retry may help);
    StageBusy at once when another live process runs the stage.
    """
    root = Path(root)
    if re.fullmatch(r"[A-Za-z0-9_.-]+", stage):
        # dvc.yaml's stage X runs `medtune X`, which refuses to start while another process holds X's
        # lock; checked here too because an unchanged stage would not start it, and DVC would then
        # judge "unchanged" from outputs that other process is writing.
        with lifetime.stage_lock(stage, root, f"Prefect task: dvc repro --single-item {stage}"):
            pass
    bin_dir = str(Path(sys.executable).parent)
    # The venv's bin first: DVC starts `medtune STAGE` through a shell, and a served flow run may not
    # have it on PATH. Unbuffered: the stage's prints reach the log while it runs, not at its end.
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1",
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    argv = [sys.executable, "-m", *lifetime.module_argv("dvc", ["repro", "--single-item", stage])]
    lines: list[str] = []
    with subprocess.Popen(argv, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", bufsize=1) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            lines.append(line)
            for piece in _pieces(line) if logger is not None else []:
                if piece.strip():
                    level, text = _level(piece)
                    logger.log(level, "%s", text)
        code = proc.wait()
    if code:
        cls = TransientStageError if _transient_output(lines) else StageError
        raise cls(f"stage {stage} failed (`dvc repro --single-item {stage}` in {root.resolve()}, exit {code}): "
                  f"{_stage_error(lines)}")
    said = [outcome for outcome, text in _DVC_SAYS.items() if text.format(stage) in lines]
    return StageRun(stage, said[0] if len(said) == 1 else "unknown", lines)


def is_transient(exc: BaseException | None) -> bool:
    """Worth a retry: I/O trouble (disk, NFS, DVC's lock), never a plain StageError/ValueError (bad input)."""
    return isinstance(exc, TransientStageError) or (isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError))


def check_params_file(root: str | Path, params: str | Path) -> None:
    """The pipeline flow runs dvc.yaml's stages, and DVC gives them params.yaml (it records that file's
    values in dvc.lock): another params file would be ignored, so it is refused instead."""
    root = Path(root).resolve()
    if (root / params).resolve() != root / "params.yaml":
        raise StageError(f"params={params}: the pipeline flow runs dvc.yaml's stages with `dvc repro`, which read "
                         f"{root / 'params.yaml'} (DVC records its values in dvc.lock); expected params.yaml. Put the "
                         "values into params.yaml, or use `dvc exp run -S KEY=VALUE`.")


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
# Undoing a failed run: back to the last committed state
# ---------------------------------------------------------------------------------------------

SNAPSHOT_DIR = ".dvc/tmp/medtune-snapshot"  # .dvc/tmp is git-ignored
PARAMS_FILE = "params.yaml"  # the only one the pipeline reads (check_params_file)


def pipeline_outs(root: str | Path) -> list[tuple[str, bool]]:
    """(path relative to root, cached?) of every output of the dvc.yaml stages (DVC's own reading)."""
    from dvc.repo import Repo

    root = Path(root).resolve()
    repo = Repo(str(root))
    try:
        outs = []
        for stage in repo.index.stages:
            if stage.addressing.endswith(".dvc"):  # data/raw.dvc etc.: not a pipeline stage
                continue
            for out in stage.outs:
                outs.append((Path(out.fs_path).resolve().relative_to(root).as_posix(), bool(out.use_cache)))
        return outs
    finally:
        repo.close()


def snapshot_workspace(root: str | Path, raw_dir: str, batch_dests: Sequence[str]) -> dict[str, Any]:
    """What `restore_workspace` needs, taken before a retrain run appends anything.

    Small things only: which batch destinations already existed in raw, whether each pipeline output
    and data/raw.dvc / dvc.lock existed, and copies of the uncached outputs (reports, lineage, card:
    DVC cannot check those out again), of raw.dvc / dvc.lock when git does not track them, and of
    params.yaml (the run sets train.init_from in it; `apply_warm_start`).
    Cached outputs come back from the DVC cache (`dvc checkout`).
    """

    root = Path(root)
    store = root / SNAPSHOT_DIR
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    outs = pipeline_outs(root)
    saved = []
    for rel in [f"{raw_dir}.dvc", "dvc.lock", PARAMS_FILE] + [o for o, cached in outs if not cached]:
        src = root / rel
        if src.is_file():
            (store / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, store / rel)
            saved.append(rel)
        elif src.is_dir():
            shutil.copytree(src, store / rel)
            saved.append(rel)
    return {"raw_dir": raw_dir, "store": SNAPSHOT_DIR, "saved": saved,
            "outs": [{"path": o, "cached": c, "existed": (root / o).exists()} for o, c in outs],
            "raw_existing": sorted(d for d in batch_dests if (root / raw_dir / d).exists())}


def _tracked_at_head(root: Path, rel: str) -> bool:
    return bool(common.git(root, "ls-tree", "--name-only", "HEAD", "--", rel, check=False))


def _remove(path: Path) -> None:

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def restore_workspace(root: str | Path, snap: dict[str, Any], batch_dests: Sequence[str], params: Any) -> list[str]:
    """Put the workspace back to the last committed state after a retrain run failed mid-way.

    1. data/raw.dvc and dvc.lock: `git checkout HEAD --` when tracked (else the snapshot's copy,
       or removed when the run created them).
    2. Raw data: only the batch files that the committed data version does not hold (`dvc diff`
       HEAD vs workspace, "added") or that this run created are removed, plus their labels.csv rows
       in csv mode. Existing raw scans are never touched; the batch originals stay in the inbox.
    3. Pipeline outputs: those the run created are removed; `dvc checkout --force` of the stages
       in the committed dvc.lock restores the cached ones; uncached ones come from the snapshot.
    4. params.yaml: the snapshot's copy (as it was before the run, a user's uncommitted edit included).
    Returns what was done, ending with the `dvc status` afterwards. A step that fails is reported
    in that list, and the remaining steps still run.
    """

    import yaml

    from components import inbox

    root = Path(root)
    store = root / snap["store"]
    raw_dir = snap["raw_dir"]
    done: list[str] = []

    def step(what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - keep restoring; the caller reports every failed step
            done.append(f"FAILED to {what}: {exc}")
            log.error("restore: could not %s: %s", what, exc)
            return None

    for rel in (f"{raw_dir}.dvc", "dvc.lock"):
        if _tracked_at_head(root, rel):
            if step(f"git checkout HEAD -- {rel}",
                    lambda rel=rel: common.git(root, "checkout", "HEAD", "--", rel) or True):
                done.append(f"{rel}: checked out from HEAD")
        elif rel in snap["saved"]:
            if step(f"restore {rel}", lambda rel=rel: shutil.copy2(store / rel, root / rel) or True):
                done.append(f"{rel}: not tracked by git; restored the copy taken before the run")
        elif (root / rel).exists():
            if step(f"remove {rel}", lambda rel=rel: (root / rel).unlink() or True):
                done.append(f"{rel}: removed (created by this run; not tracked by git)")

    # Raw data: what this run (or an earlier crashed attempt of the same batch) added, nothing else.
    def uncommitted() -> set[str]:
        diff = json.loads(common.dvc(root, "diff", "--json", "--targets", raw_dir) or "{}")
        prefix = raw_dir.rstrip("/") + "/"
        return {d["path"][len(prefix):] for d in diff.get("added", []) if d["path"].startswith(prefix)}

    added = step("list the raw files the committed data version does not hold (dvc diff)", uncommitted)
    created = set(batch_dests) - set(snap["raw_existing"])
    doomed = sorted(created | (set(batch_dests) & (added or set())))
    removed = step("remove the appended batch files from the raw data",
                   lambda: inbox.remove_from_raw(root / raw_dir, doomed, params)) or []
    done.append(f"{raw_dir}: removed {len(removed)} appended file(s) of the failed batch(es); "
                "existing raw files untouched")

    # Pipeline outputs.
    for out in snap["outs"]:
        if not out["existed"] and (root / out["path"]).exists():
            if step(f"remove {out['path']}", lambda out=out: _remove(root / out["path"]) or True):
                done.append(f"{out['path']}: removed (created by the failed run)")
    lock = root / "dvc.lock"
    stages = sorted((yaml.safe_load(lock.read_text()) or {}).get("stages", {})) if lock.is_file() else []
    if stages:
        if step("dvc checkout the committed outputs",
                lambda: common.dvc(root, "checkout", "--force", *stages) or True):
            done.append(f"dvc checkout --force {' '.join(stages)}")
    for out in snap["outs"]:
        if not out["cached"] and out["path"] in snap["saved"]:
            def put_back(rel: str = out["path"]) -> None:
                _remove(root / rel)
                if (store / rel).is_dir():
                    shutil.copytree(store / rel, root / rel)
                else:
                    shutil.copy2(store / rel, root / rel)
            step(f"restore {out['path']}", put_back)
    done.append("uncached outputs (reports, lineage, model card) restored from the snapshot")
    if PARAMS_FILE in snap["saved"]:
        if step(f"restore {PARAMS_FILE}", lambda: shutil.copy2(store / PARAMS_FILE, root / PARAMS_FILE) or True):
            done.append(f"{PARAMS_FILE}: restored as it was before the run")
    status = step("run dvc status", lambda: common.dvc(root, "status"))
    done.append(f"dvc status: {status}" if status is not None else "dvc status: unknown")
    return done


def apply_warm_start(root: str | Path, params_path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """Set train.init_from in params.yaml to what this retrain starts from (`registry.warm_start_plan`:
    the champion's weights, or null for a cold start) and return the plan, whose `reason` says which and
    why. params.yaml keeps its comments; it is rewritten only when the value changes, so DVC retrains
    exactly when the starting weights do, and the release commits the value (`dvc params diff` shows it)."""
    from components import presets, registry
    from components.params import load_params

    root = Path(root)
    path = root / params_path
    plan = registry.warm_start_plan(root, load_params(path))
    if load_params(path).train.init_from != plan["init_from"]:
        presets.apply(path, {"train": {"init_from": plan["init_from"]}})
    log.debug("%s", plan["reason"])  # the retrain flow logs it to its run
    return plan


def keep_failed_outputs(root: str | Path, snap: dict[str, Any], dest: str | Path) -> list[str]:
    """Copy the failed run's uncached outputs (e.g. reports/validation.md saying why) to `dest`
    before `restore_workspace` puts the committed ones back. Returns the paths copied."""

    root, dest = Path(root), Path(dest)
    shutil.rmtree(dest, ignore_errors=True)
    copied = []
    for out in snap["outs"]:
        src = root / out["path"]
        if out["cached"] or not src.exists():
            continue
        (dest / out["path"]).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest / out["path"])
        copied.append(out["path"])
    return copied


def undo_failed_run(root: str | Path, snap: dict[str, Any], batch_dests: Sequence[str], params: Any,
                    batches: Sequence[str], error: str, quarantine_dir: str | Path,
                    context: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """After a retrain run failed past the append: restore the workspace and quarantine the batches.

    The failed run's reports (e.g. validation.md saying why) are kept first, then
    `restore_workspace` puts the committed ones back, then every appended batch is quarantined with
    the error and a copy of those reports in `failed-run/`. All of them: the pipeline ran on them
    together, so which one caused the failure is not known (the report says so). Never raises, so
    the caller's error is never masked: a step that fails is logged and reported in the result.
    Returns (what restore did, [{"batch", "quarantine" (None if it stays in the inbox)}]).
    """
    from components import inbox

    root = Path(root)
    evidence = root / (SNAPSHOT_DIR + "-failed-run")
    try:
        keep_failed_outputs(root, snap, evidence)
    except OSError as exc:
        log.warning("could not keep the failed run's reports: %s", exc)
    try:
        restored = restore_workspace(root, snap, batch_dests, params)
    except Exception as exc:  # noqa: BLE001 - reported in the result and the failure record
        restored = [f"FAILED to restore the workspace: {exc}"]
        log.error("could not restore the workspace: %s", exc)
    drop_snapshot(root)
    names = [Path(b).name for b in batches]
    where: list[dict[str, Any]] = []
    for batch in batches:
        try:
            dest = inbox.quarantine(batch, quarantine_dir, [f"pipeline failed after the batch was appended: {error}"],
                                    {**context, "failure": {"error": error, "batches_in_run": names},
                                     "restored": restored})
            if evidence.is_dir():
                shutil.copytree(evidence, dest / "failed-run")
            where.append({"batch": Path(batch).name, "quarantine": str(dest)})
        except Exception as exc:  # noqa: BLE001 - the batch stays in the inbox, and the record says so
            log.error("could not quarantine %s (it stays in the inbox): %s", batch, exc)
            where.append({"batch": Path(batch).name, "quarantine": None})
    shutil.rmtree(evidence, ignore_errors=True)
    return restored, where


def drop_snapshot(root: str | Path) -> None:

    shutil.rmtree(Path(root) / SNAPSHOT_DIR, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

SERVER_RECORD = "medtune-server.json"  # under PREFECT_HOME: where `medtune server` said it listens


def _api_url() -> str:
    return os.environ.get("PREFECT_API_URL") or DEFAULT_API


def _server_record() -> Path:
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home) / SERVER_RECORD


def running_server() -> str | None:
    """The Prefect API for this process: PREFECT_API_URL (environment or Prefect profile) when set;
    otherwise the server `medtune server` started, if it answers: the address it recorded under
    PREFECT_HOME, then the default http://127.0.0.1:4200/api. A server found that way is set as
    PREFECT_API_URL for this process and its children. None when none answers; no server is started.

    The commands import Prefect before they run (flows/serve.py, flows/retrain.py), and Prefect reads its
    settings at import, so the settings are refreshed here: without it, an environment variable set
    now is ignored and a flow run starts a temporary server of its own.
    """
    from prefect.context import refresh_global_settings_context
    from prefect.settings import get_current_settings

    refresh_global_settings_context()  # whatever the caller put into os.environ since the import
    configured = get_current_settings().api.url
    if configured:
        return configured
    candidates = []
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        candidates.append(str(json.loads(_server_record().read_text())["api"]))
    for url in dict.fromkeys([*candidates, DEFAULT_API]):
        if _answers(url):
            os.environ["PREFECT_API_URL"] = url
            refresh_global_settings_context()
            return url
    return None


def cmd_server(args: argparse.Namespace) -> None:
    quiet_env()
    exe = Path(sys.executable).parent / "prefect"
    argv = [str(exe) if exe.is_file() else "prefect", "server", "start", "--host", args.host, "--port", str(args.port)]
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    api = f"http://{host}:{args.port}/api"
    print(f"Prefect server on http://{args.host}:{args.port} (API: {api})", flush=True)
    # For `medtune serve`, `retrain` and `ingest-new` without PREFECT_API_URL (running_server); a stale
    # record is harmless: they use it only while a server answers there.
    record = _server_record()
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
        raise StageError(f"serve: no Prefect server answers at {DEFAULT_API} (nor where `medtune server` last "
                         "recorded it) and PREFECT_API_URL is not set. Start one first, `medtune server` (in another "
                         "terminal, or `medtune server &`), or set PREFECT_API_URL to the server to use.")
    print(f"serving the deployments on the Prefect server at {url}", flush=True)
    from flows.serve import serve_deployments

    serve_deployments(Path(args.root).resolve(), args.params)


def cmd_retrain(args: argparse.Namespace) -> None:
    quiet_env()
    if not args.once:
        raise StageError("retrain: pass --once to run one retrain now; `medtune serve` runs it on schedule and on events.")
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
    from components import registry
    from components.inbox_listing import find_batches
    from components.params import load_params

    check_params_file(root, params)
    inbox_dir = load_params(root / params).retrain.inbox_dir
    if find_batches(root / inbox_dir) or registry.pending(root):
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
    width = max(map(len, result["stages"]), default=0)
    for stage, outcome in result["stages"].items():
        print(f"{stage:<{width}}  {OUTCOMES.get(outcome, outcome)}", file=sys.stderr)
    print(json.dumps(result, indent=2, sort_keys=True, default=str))
    if "gate-failed" in result["stages"].values():  # as `dvc repro` fails at export: no model this run
        raise StageError("the model failed the gate and was not exported; see reports/gate.json")


@contextlib.contextmanager
def prefect_api() -> Iterator[str | None]:
    """The Prefect API for a flow run in this process: the configured one (PREFECT_API_URL, in the
    environment or the Prefect profile) or the one `medtune server` started (running_server), else a
    temporary server of this process's own.

    Prefect 3 would start that temporary server itself (SubprocessASGIServer) and stop it only from
    atexit, which a `kill -9` skips: the server lived on. This starts the same server (Prefect's
    own command line) through components.lifetime, so the kernel kills it when this process dies
    however it dies, on a free 127.0.0.1 port; points PREFECT_API_URL at it for this process and its
    threads; and stops it when the block ends, normally or by an exception.
    """
    import prefect
    from prefect.context import refresh_global_settings_context
    from prefect.settings import get_current_settings

    url = running_server()  # PREFECT_API_URL, or the server `medtune server` started
    settings = get_current_settings()
    if url or not settings.server.ephemeral.enabled:
        if url:
            log.info("Prefect server: %s", url)
        yield url  # a server of its own, or Prefect's error when temporary servers are off
        return
    # Prefect 3.8's SubprocessASGIServer._run_uvicorn_command, word for word.
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           **settings.to_environment_variables(exclude_unset=True)}
    timeout = settings.server.ephemeral.startup_timeout_seconds
    proc, url = None, ""
    for _ in range(3):  # the free port can be taken between our probe and the server's bind
        port = _free_port()
        url = f"http://127.0.0.1:{port}/api"
        proc = subprocess.Popen([sys.executable, "-m", *lifetime.module_argv("uvicorn", [
            "--app-dir", str(prefect.__module_path__.parent), "--factory", "prefect.server.api.server:create_app",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"])], env=env)
        if _wait_healthy(proc, url, timeout):
            break
        _stop(proc)
    else:
        raise StageError(f"the temporary Prefect server did not answer on {url}/health within {timeout} s "
                         f"(exit code {proc.returncode}); see its output above. Or start one (`medtune server`) "
                         "and set PREFECT_API_URL=http://127.0.0.1:4200/api.")
    log.info("temporary Prefect server for this run on %s (pid %d); it stops with this process", url, proc.pid)
    saved = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    # Prefect's settings were read at import; this makes every thread (the events and log workers
    # too, which do not see a temporary_settings context) use this server.
    refresh_global_settings_context()
    try:
        yield url
    finally:
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved
        refresh_global_settings_context()
        _stop(proc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str, timeout: float = 2) -> bool:
    """A Prefect API answers at `url` (its /health says true)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200 and r.read().strip() == b"true"
    except (OSError, ValueError):  # URLError is an OSError
        return False


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if _answers(url):
            return True
        time.sleep(0.2)
    return False


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (uvicorn shuts down cleanly), SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cmd_ingest_new(args: argparse.Namespace) -> None:
    quiet_env()
    from components.inbox import EVENT, add_to_inbox
    from components.params import load_params

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
        raise StageError(f"no Prefect server answers at {DEFAULT_API} (nor where `medtune server` last recorded it) "
                         "and PREFECT_API_URL is not set, so no event was sent: the batch stays in the inbox for "
                         "the next scheduled run. Start `medtune server` and `medtune serve`, or run "
                         "`medtune retrain --once` now.")
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
    p.add_argument("--params", default="params.yaml",
                   help="parameters, including the `retrain:` section (default: params.yaml)")


def _run(command: str, description: str, add_args: Callable[[argparse.ArgumentParser], None],
         func: Callable[[argparse.Namespace], None], argv: Sequence[str] | None) -> int:
    # `--params` comes from _common (server has none), so stage_main must not add its own.
    return common.stage_main(description, add_args, func, argv, prog=f"medtune {command}", params_flag=False)


# One `main(argv)` per command; cli.py maps `medtune server` to this module's `main`, `retrain` to
# `retrain_main` (its empty-inbox check comes before Prefect), `serve` and `pipeline` to flows.serve /
# flows.pipeline, `ingest-new` to components.inbox (each calls these).
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


def pipeline_main(argv: Sequence[str] | None = None) -> int:
    return _run("pipeline", "Run the pipeline once as a Prefect flow: one task per dvc.yaml stage, each "
                "`dvc repro --single-item STAGE` (unchanged stages are skipped; DVC writes dvc.lock).",
                _common, cmd_pipeline, argv)


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
