"""The stages of dvc.yaml, run by DVC: which there are and in what order (DVC's own graph), one stage
run as `dvc repro --single-item STAGE` with its outcome and log lines, and the errors worth a retry.
The pipeline flow (flows/pipeline.py) runs a Prefect task per stage through run_stage.
"""

from __future__ import annotations

import builtins
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from components import lifetime
from components.common import StageError

log = logging.getLogger("medtune.stages")

GATE_FILE = "reports/gate.json"  # evaluate's decision; a stage that reads it (export) runs only if it passed


@dataclass(frozen=True)
class PipelineStage:
    """One dvc.yaml stage as DVC reads it (interpolation resolved)."""

    name: str  # what `dvc repro` in the root takes: "train" ("sub/dvc.yaml:train" for a nested dvc.yaml)
    deps: tuple[str, ...]  # dependency paths relative to the project root
    outs: tuple[str, ...]  # outs, metrics and plots, relative to the project root


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
        return [
            PipelineStage(address(st), tuple(rel(d.fs_path) for d in st.deps), tuple(rel(o.fs_path) for o in st.outs))
            for st in plan_repro(repo.index.graph)
            if isinstance(st, DvcPipelineStage)
        ]


class TransientStageError(StageError):
    """A stage failed on something a retry may get past: DVC's lock held by another DVC command in the
    workspace, or an OSError (other than a missing file) raised in the stage."""


@dataclass
class StageRun:
    stage: str
    outcome: str  # "ran" | "skipped" (unchanged) | "run-cache" (restored, not run) | "unknown"
    lines: list[str]  # everything dvc and the stage printed, in order


# Each outcome in words: the message of the pipeline flow's task state and of `medtune pipeline`.
OUTCOMES = {
    "ran": "ran",
    "skipped": "skipped: unchanged since dvc.lock",
    "run-cache": "skipped: outputs restored from DVC's run cache, not run",
    "gate-failed": "not run: the gate failed, so no model this run (reports/gate.json)",
    "unknown": "finished, but DVC's output did not say whether it ran (see the log)",
}


# What DVC 3 logs for each outcome of `dvc repro --single-item STAGE` (dvc/stage/run.py,
# dvc/stage/__init__.py, dvc/stage/cache.py). Its English is the only place DVC says which it was;
# tests/test_stages.py and tests/test_flows.py fail if a DVC upgrade changes it.
_DVC_SAYS = {
    "ran": "Running stage '{}':",
    "skipped": "Stage '{}' didn't change, skipping",
    "run-cache": "Stage '{}' is cached - skipping run, checking out outputs",
}
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
            last = next((x for x in lines[i + 1 :] if x and not x[0].isspace()), None)
    return last


def _stage_error(lines: list[str]) -> str:
    """The stage's own error message (`error: ...`, possibly several lines, e.g. the failed validation
    checks), without DVC's summary after it; else the exception a traceback ended with, and DVC's
    `ERROR:` lines."""
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    if starts:
        body = []
        for line in lines[starts[-1] :]:
            if line.startswith("ERROR: "):
                break
            body.append(line)
        return "\n".join(body)[len("error: ") :].strip()
    said = [x for x in [_raised(lines)] if x] + [line[len("ERROR: ") :] for line in lines if line.startswith("ERROR: ")]
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


def run_stage(
    stage: str, root: str | Path = ".", logger: logging.Logger | logging.LoggerAdapter | None = None
) -> StageRun:
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
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PYTHONUNBUFFERED": "1",
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }
    argv = [sys.executable, "-m", *lifetime.module_argv("dvc", ["repro", "--single-item", stage])]
    lines: list[str] = []
    with subprocess.Popen(
        argv,
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
    ) as proc:
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
        raise cls(
            f"stage {stage} failed (`dvc repro --single-item {stage}` in {root.resolve()}, exit {code}): "
            f"{_stage_error(lines)}"
        )
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
        raise StageError(
            f"params={params}: the pipeline flow runs dvc.yaml's stages with `dvc repro`, which read "
            f"{root / 'params.yaml'} (DVC records its values in dvc.lock); expected params.yaml. Put the "
            "values into params.yaml, or use `dvc exp run -S KEY=VALUE`."
        )
