"""The evaluate stage's records and reports for a regression model (data.task: regression).

    record = regression_record(y_true, y_pred, ckpt, params)   # MAE, RMSE, R^2 with intervals, ...
    write_regression_reports(reports_dir, record, gate, index, y_pred)

Predictions are in the target's unit: the model's one output times the train split's target standard
deviation plus its mean, both recorded in the checkpoint (components/model/train.py). The metrics are
components/model/metrics.regression_metrics's. The reports are those the classification evaluate
writes, under the same names, so dvc.yaml declares one set: evaluation.json (the whole record, with
"task": "regression"), metrics.json (numbers only, `regression_view`), gate.json,
test_predictions.csv (`path,sha256,target,predicted`) and scatter.csv (`true,predicted` per test
image, no path: the predicted-vs-true plot dvc.yaml declares); roc.csv and confusion.csv are their
header only and roc.png and confusion.png say that a regression has neither.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.common import atomic_path, write_json
from components.model.metrics import regression_metrics
from components.params import Params
from components.plots import figure, save_png

log = logging.getLogger("medtune.evaluate")

RECORD, METRICS = "evaluation.json", "metrics.json"  # as components/model/evaluate.py names them
SCATTER = "scatter.csv"
DIGITS = 6  # decimals of the CSVs' numbers


def regression_record(y_true: np.ndarray, y_pred: np.ndarray, ckpt: dict[str, Any], params: Params) -> dict[str, Any]:
    """The evaluation record: `regression_metrics` (ValueError on bad arrays) plus the task, the
    standardisation the model's output was undone with, and the test-time augmentation applied."""
    ev = params.evaluate
    return {
        "task": "regression",
        **regression_metrics(y_true, y_pred, ev.bootstrap, ev.seed),
        "target_mean": float(ckpt["target_mean"]),
        "target_std": float(ckpt["target_std"]),
        "tta": ev.tta,
    }


def regression_view(record: dict[str, Any]) -> dict[str, float | int]:
    """reports/metrics.json of a regression: mae, rmse, r2 each with its interval (`<name>_ci_low`,
    `<name>_ci_high`), n_test, and with the linear probe `probe_mae`, `mae_gain` and its interval; an
    undefined value (R^2 of targets all equal) is left out rather than written as null."""
    probe = record.get("linear_probe") or {}
    view: dict[str, Any] = {}
    for name in ("mae", "rmse", "r2"):
        lo, hi = record.get(f"{name}_ci") or (None, None)
        view.update({name: record.get(name), f"{name}_ci_low": lo, f"{name}_ci_high": hi})
    gain_lo, gain_hi = probe.get("mae_gain_ci") or (None, None)
    view.update(
        n_test=record.get("n_test"),
        probe_mae=probe.get("mae"),
        mae_gain=probe.get("mae_gain"),
        mae_gain_ci_low=gain_lo,
        mae_gain_ci_high=gain_hi,
    )
    return {
        k: v for k, v in view.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, lineterminator="\n")


def _not_applicable(what: str, path: Path) -> None:
    """A small figure saying the classification plot `what` does not exist for a regression."""
    fig, ax = figure(4.5, 1.6)
    ax.axis("off")
    ax.text(
        0.5,
        0.5,
        f"No {what}: data.task is regression.\nPredicted vs true: reports/{SCATTER} (dvc plots show).",
        ha="center",
        va="center",
        fontsize=9,
    )
    save_png(fig, path)


def write_regression_reports(
    reports_dir: Path, record: dict[str, Any], gate: dict[str, Any], index: pd.DataFrame, y_pred: np.ndarray
) -> None:
    """The stage's outputs in `reports_dir` (`index` the test split's rows, `y_pred` the predictions
    in the target's unit, in index order)."""
    y_true = np.asarray(pd.to_numeric(index["target"]), dtype=np.float64)
    preds = pd.DataFrame(
        {
            "path": index["path"].to_numpy(),
            "sha256": index["sha256"].to_numpy(),
            "target": y_true,
            "predicted": np.round(y_pred, DIGITS),
        }
    )
    reports_dir.mkdir(parents=True, exist_ok=True)
    write_json(reports_dir / RECORD, record)
    write_json(reports_dir / METRICS, regression_view(record))
    write_json(reports_dir / "gate.json", gate)
    _write_csv(reports_dir / "test_predictions.csv", preds)
    _write_csv(reports_dir / SCATTER, pd.DataFrame({"true": y_true, "predicted": np.round(y_pred, DIGITS)}))
    _write_csv(reports_dir / "roc.csv", pd.DataFrame(columns=["fpr", "tpr"]))
    _write_csv(reports_dir / "confusion.csv", pd.DataFrame(columns=["actual", "predicted"]))
    _not_applicable("ROC curve", reports_dir / "roc.png")
    _not_applicable("confusion matrix", reports_dir / "confusion.png")


def _ci(interval: list[float | None]) -> str:
    lo, hi = interval
    return f"{lo:.4g} to {hi:.4g}" if lo is not None else "n/a"


def log_regression(record: dict[str, Any]) -> None:
    """One line of test metrics with their intervals."""
    r2 = record["r2"]
    log.info(
        "test n=%d mae=%.4g (95%% CI %s) rmse=%.4g (95%% CI %s) r2=%s (95%% CI %s, %d valid resamples)",
        record["n_test"],
        record["mae"],
        _ci(record["mae_ci"]),
        record["rmse"],
        _ci(record["rmse_ci"]),
        "undefined" if r2 is None else f"{r2:.3f}",
        _ci(record["r2_ci"]),
        record["bootstrap_valid"],
    )
