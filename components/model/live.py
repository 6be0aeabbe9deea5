"""The train stage's DVCLive logger: each epoch's metrics (`dvclive/plots/metrics/**.tsv`, one file per
metric, step = epoch) and the summary of the kept model (`dvclive/metrics.json`), which dvc.yaml
declares as the stage's plots and metrics."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("medtune.train")
# DVCLive metric name (a file dvclive/plots/metrics/<name>.tsv) of each per-epoch history value a row
# has (val_auroc and val_accuracy: classification; val_mae: regression, in the target's unit).
LIVE_METRICS = {
    "train_loss": "train/loss",
    "val_loss": "val/loss",
    "val_auroc": "val/auroc",
    "val_accuracy": "val/accuracy",
    "val_mae": "val/mae",
    "lr": "lr",
}


def open_live(live_dir: Path) -> Any:
    """A DVCLive logger that writes only `live_dir`/metrics.json and `live_dir`/plots/metrics/ (no
    dvc.yaml of its own: dvc.yaml declares them; no report; no experiment of its own)."""
    from dvclive import Live

    class StageLive(Live):
        def _init_dvc(self) -> None:
            # DVCLive looks for the DVC project (and `dvc init`s a git repository that has none).
            # Only under `dvc repro` / `dvc exp run` (which set DVC_ROOT) is there one to find; a flow
            # calling the stage in-process, a test or a plain `medtune train` just write the files.
            # Its DVC integration (live updates to DVC Studio) is a bonus: where it fails (a git
            # repository without commits raises) the files are written all the same.
            if not os.environ.get("DVC_ROOT"):
                return
            try:
                super()._init_dvc()
            except Exception as exc:  # noqa: BLE001 - scmrepo and dvc raise several types
                log.debug("DVCLive without its DVC integration: %s", exc)
                self._dvc_repo, self._inside_dvc_exp = None, False

    return StageLive(str(live_dir), save_dvc_exp=False, dvcyaml=False, report=None)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def log_epoch(live: Any, row: dict[str, Any], prefix: str = "") -> None:
    """One epoch of one model to DVCLive, at step = epoch (`prefix` "member<i>/" in an ensemble)."""
    live.step = row["epoch"]
    for key, name in LIVE_METRICS.items():
        if key in row:
            live.log_metric(prefix + name, row[key])
    live.next_step()


def live_summary(fits: list[dict[str, Any]], ensemble_val: dict[str, float] | None) -> dict[str, Any]:
    """dvclive/metrics.json: the validation metrics of the model that is kept (a single model's best
    epoch, or the ensemble's averaged logits), its best epoch, and `step` (the last epoch run)."""
    if ensemble_val is None:
        f = fits[0]
        best = next(r for r in f["history"] if r["epoch"] == f["best_epoch"])
        out: dict[str, Any] = {
            "best_epoch": f["best_epoch"],
            "train": {"loss": best["train_loss"]},
            "val": {k.removeprefix("val_"): v for k, v in best.items() if k.startswith("val_")},
        }
    else:
        out = {"val": {k.removeprefix("val_"): v for k, v in ensemble_val.items()}}
    for group in ("train", "val"):  # an undefined value (nan AUROC of a one-class split) is left out
        if group in out:
            out[group] = {k: v for k, v in out[group].items() if _finite(v)}
    return {"step": max(f["epochs_run"] for f in fits), **out}
