"""One trial as one DVC experiment: `dvc exp run --temp train -S key=value ... -n tune-<study>-<n>`.

`--temp`: DVC runs the experiment in its own temporary copy of the project (under .dvc/tmp/exps/) and
saves it as a git ref, so the workspace is never changed, several trials can run at once, and a trial
killed half-way leaves nothing in the workspace. The target is the train stage: a trial runs the
pipeline up to train (the stages before it are skipped when HEAD's dvc.lock has them) and never
evaluate, so the search never sees the test split. Its score is the kept epoch's validation metric,
from the experiment's own `dvclive/metrics.json` (read back from DVC's cache by `dvc.api`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from components.common import StageError, run_tool
from components.lifetime import module_argv

STAGE = "train"  # the experiments' target: never evaluate (test metrics)
LIVE_METRICS = "dvclive/metrics.json"
# Code and pipeline files: an uncommitted change there would be part of every trial but not of the
# baseline they are compared with, and `--apply` would mix it into params.yaml's diff.
_UNTRACKED_CODE = ("components/", "flows/", "dvc.yaml", "params.yaml", "dvc.lock")
INTERRUPT_GRACE_S = 60  # for DVC to remove its temporary copy after Ctrl-C
_dvc_api = threading.Lock()  # dvc.api opens a Repo per call; one at a time from the trial threads


def exp_prefix(study: str) -> str:
    return f"tune-{study}-"


def exp_name(study: str, number: int) -> str:
    return f"{exp_prefix(study)}{number}"


def dirty_paths(root: Path) -> list[str]:
    """Uncommitted changes that would leak into the trials: any change to a tracked file (staged or
    not), and untracked code or pipeline files."""
    out = []
    # run_tool, not git(): its stripping would eat the first line's leading status column.
    status = run_tool(["git", "status", "--porcelain", "--untracked-files=all"], root).stdout
    for line in status.splitlines():
        path = line[3:]
        if not line.startswith("??") or path.startswith(_UNTRACKED_CODE):
            out.append(path)
    return out


def check_clean_base(root: Path) -> None:
    """StageError unless HEAD is a clean base for experiments (see dirty_paths)."""
    if run_tool(["git", "rev-parse", "--verify", "-q", "HEAD"], root, check=False).returncode != 0:
        raise StageError(f"{root}: no git commit yet; trials are DVC experiments on HEAD: commit the project first.")
    dirty = dirty_paths(root)
    if dirty:
        shown = ", ".join(dirty[:8]) + (f" and {len(dirty) - 8} more" if len(dirty) > 8 else "")
        raise StageError(
            f"{root}: uncommitted changes ({shown}). Every trial is a DVC experiment on HEAD and the best "
            "values are applied to the committed params.yaml, so the search needs a clean base: commit the "
            "changes (or move them aside) and run medtune tune again."
        )


def has_lock(root: Path) -> bool:
    """Whether HEAD has a dvc.lock, so trials skip the stages before train whose inputs are unchanged
    instead of each running the whole pipeline up to it."""
    return run_tool(["git", "cat-file", "-e", "HEAD:dvc.lock"], root, check=False).returncode == 0


def run_trial(root: Path, name: str, flags: list[str], env: dict[str, str], log: Path) -> None:
    """`dvc exp run --temp train <flags> -n name`, its output in `log`; StageError naming the log's
    last lines when it fails. DVC runs under components.lifetime, bound to this process: when the
    search is killed, its trials die with it instead of running on unseen (`clear_stale` then removes
    DVC's copies they leave). On Ctrl-C the terminal interrupts DVC too: it is given time to clean up."""
    cmd = [sys.executable, "-m", *module_argv("dvc", ["exp", "run", "--temp", STAGE, *flags, "-n", name])]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=root, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            try:
                proc.wait(timeout=INTERRUPT_GRACE_S)
            finally:
                proc.kill()
            raise
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise StageError(f"trial {name}: dvc exp run exited {code} (full output: {log}):\n{tail}")


def clear_stale(root: Path, prefix: str) -> list[str]:
    """Remove what killed trials left in DVC's experiment area: the temporary copy and run record of
    each experiment named `prefix`* that DVC still counts as running (`dvc exp show` would list it as
    Running for ever). Call only while no trial of that name can be running (the study's lock)."""
    from dvc.repo.experiments.executor.base import ExecutorInfo, TaskStatus

    cleared = []
    for infofile in sorted((root / ".dvc" / "tmp" / "exps" / "run").glob("*/*.run")):
        info = ExecutorInfo.load_json(str(infofile))
        running = info.status <= TaskStatus.SUCCESS and Path(info.root_dir).exists()  # as DVC's iter_active
        if info.location == "tempdir" and (info.name or "").startswith(prefix) and running:
            shutil.rmtree(info.root_dir, ignore_errors=True)
            shutil.rmtree(infofile.parent, ignore_errors=True)
            cleared.append(info.name)
    return cleared


def live_metrics(root: Path, name: str) -> dict[str, Any]:
    """The experiment's dvclive/metrics.json: the kept epoch's validation metrics and `step`."""
    import dvc.api

    with _dvc_api:
        return json.loads(dvc.api.read(LIVE_METRICS, repo=str(root), rev=name))


def score(metrics: dict[str, Any], metric: str) -> float | None:
    """tune.metric (val_loss, val_auroc, ...) of the kept epoch, from dvclive/metrics.json; None if
    train left it out (undefined, e.g. the AUROC of a one-class validation split)."""
    value = metrics.get("val", {}).get(metric.removeprefix("val_"))
    return float(value) if isinstance(value, (int, float)) else None
