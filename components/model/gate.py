"""The release gate: evaluate's test metrics against the task's `evaluate.gate` thresholds, written to
reports/gate.json, which export checks before it ships a model.

    gate = apply_gate(metrics, params)   # {passed, reasons, failed, thresholds, metrics}

Classification checks its min_* gates (min_auroc, min_sensitivity, ...), regression (data.task) its own:
r2 >= min_r2 and mae <= max_mae, a null one off. Each task ignores the other's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from components.params import Params

log = logging.getLogger("medtune.evaluate")
METRICS = "metrics.json"  # in the reports folder, as components/model/evaluate.py writes it


REGRESSION_GATES = ("min_r2", "max_mae")  # the gates of data.task regression; every other one is classification's


def gate_thresholds(params: Params) -> dict[str, float | None]:
    """The `evaluate.gate` keys of this task (data.task), with their values (null: that gate is off)."""
    # Every GateParams field belongs to one task, so a new gate key cannot be declared and then
    # silently left unchecked.
    regression = params.data.regression
    return {k: v for k, v in params.evaluate.gate.to_dict().items() if (k in REGRESSION_GATES) == regression}


def apply_gate(metrics: dict[str, Any], params: Params) -> dict[str, Any]:
    """Compare metrics with the task's `evaluate.gate` (`gate_thresholds`); every check is listed in
    `reasons`, failures in `failed`.

    Each gate key `min_<metric>` is checked as metrics[<metric>] >= it, `max_<metric>` as <= it (a
    regression's max_mae); a null gate is off; a missing or non-finite metric fails its check.
    """
    thresholds = gate_thresholds(params)
    reasons, failed, used = [], [], {}
    for key, bound in thresholds.items():
        if bound is None:
            continue
        kind, name = key.split("_", 1)
        value = metrics.get(name)
        used[name] = value
        ok, bad = (">=", "<") if kind == "min" else ("<=", ">")
        if value is None or not np.isfinite(value):
            text = f"{name} is undefined; needs {ok} {key} {bound}"
        elif (value < bound) if kind == "min" else (value > bound):
            text = f"{name} {round(value, 4)} {bad} {key} {bound}"
        else:
            reasons.append(f"{name} {round(value, 4)} {ok} {key} {bound}")
            continue
        reasons.append(text)
        failed.append(text)
    return {"passed": not failed, "reasons": reasons, "failed": failed, "thresholds": thresholds, "metrics": used}


def log_gate(gate: dict[str, Any], reports_dir: Path) -> None:
    """The gate's verdict (a failure under a banner)."""
    if gate["passed"]:
        log.info("gate PASSED: %s", "; ".join(gate["reasons"]))
    else:
        banner = "!" * 72
        log.warning(
            "%s\nGATE FAILED: %s\nThe export stage will refuse this model; metrics are in %s.\n%s",
            banner,
            "; ".join(gate["failed"]),
            reports_dir / METRICS,
            banner,
        )
