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
_dvc_api = threading.Lock()  # dvc.api opens a Repo per call; one at a time from the trial threads


def exp_name(study: str, number: int) -> str:
    return f"tune-{study}-{number}"


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
    search dies, its trials die with it (and DVC's temp copies with them), never running on unseen."""
    cmd = [sys.executable, "-m", *module_argv("dvc", ["exp", "run", "--temp", STAGE, *flags, "-n", name])]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        code = subprocess.run(cmd, cwd=root, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise StageError(f"trial {name}: dvc exp run exited {code} (full output: {log}):\n{tail}")


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
