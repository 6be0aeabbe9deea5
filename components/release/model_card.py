"""The model card (models/model_card.md): one model's summary for a human reader, laid out by
release/templates/model_card.md.j2 from the records export reads.

    text = model_card(mid, ckpt, manifest, metrics, gate, meta, exp, synthetic, validation)

model_card computes every value the template shows (the template is strict: a missing one fails): what
every card shows, then classification_values, with interval_rows the test proportions with their 95%
Wilson intervals; synthetic_demo tells whether the scans are `medtune demo-data`'s, which the card then
says. A regression checkpoint's card (REGRESSION_TEMPLATE, regression_values) shows MAE, RMSE and R^2
with their bootstrap intervals (value_rows) and the gain over the linear probe in MAE (value_probe) instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from components.common import SPLITS
from components.templates import render

# Validation checks that a params tolerance can let fail without stopping; the test metrics of a
# model trained past them are optimistic, and its card says so.
LEAKS = {
    "duplicates_in_one_split": ("byte-identical", "max_duplicates"),
    "near_duplicates_in_one_split": ("near-duplicate", "max_near_duplicates"),
}


CARD_TEMPLATE = "release/templates/model_card.md.j2"
REGRESSION_TEMPLATE = "release/templates/model_card_regression.md.j2"
# A regression's test metrics, in the card's, the trace's and the report's order, with their names there.
VALUE_METRICS = (("mae", "MAE"), ("rmse", "RMSE"), ("r2", "R^2"))


def model_card(
    mid: str,
    ckpt: dict,
    manifest: dict,
    metrics: dict,
    gate: dict,
    meta: dict,
    exp: dict,
    synthetic: bool,
    validation: dict | None = None,
) -> str:
    """The human-readable summary of one model (Markdown), laid out by CARD_TEMPLATE (REGRESSION_TEMPLATE
    for a regression checkpoint) from what every card shows and the task's own values."""
    regression = ckpt.get("task") == "regression"
    context = {
        **_common_context(mid, ckpt, manifest, meta, exp, synthetic, validation),
        **(regression_values(ckpt, metrics, meta) if regression else classification_values(manifest, metrics)),
        "gate_passed": gate["passed"],
        "gate_reasons": gate.get("reasons", []),
    }
    return render(REGRESSION_TEMPLATE if regression else CARD_TEMPLATE, **context)


def classification_values(manifest: dict, metrics: dict) -> dict[str, Any]:
    """A classifier card's values: the classes per split, the test metrics with their intervals, the
    calibration and the gain over the linear probe."""
    classes = list(metrics["classes"])
    counts = manifest.get("counts") or {}
    lo, hi = metrics["auroc_ci"]
    return {
        "classes": classes,
        "splits": [{"name": s, "counts": [counts.get(s, {}).get(c, 0) for c in classes]} for s in SPLITS],
        "metrics": {
            **{k: metrics[k] for k in ("n_test", "auroc", "f1", "confusion_matrix")},
            "averaging": metrics.get("averaging", ""),
            "auroc_low": lo,
            "auroc_high": hi,
            "bootstrap_valid": metrics.get("bootstrap_valid"),
            "tta": metrics.get("tta", "none"),
            "positive_class": metrics.get("positive_class"),
            "threshold": metrics.get("threshold"),
            "threshold_method": metrics.get("threshold_method") or "fixed",
        },
        "intervals": interval_rows(metrics),
        "macro": [(n, metrics[n]) for n in ("sensitivity", "specificity", "precision")] if len(classes) > 2 else [],
        "calibration": metrics.get("calibration") or {"method": "none"},
        "probe": probe_rows(metrics),
    }


def _common_context(
    mid: str, ckpt: dict, manifest: dict, meta: dict, exp: dict, synthetic: bool, validation: dict | None
) -> dict[str, Any]:
    """What every card shows whatever the task: the data version, the model and its start, the input, the
    export's parity, and the validation leaks that make the test metrics optimistic."""
    train = {k: None for k in ("freeze", "unfreeze_last_n", "optimizer", "lr", "seed")}
    train.update((ckpt.get("params") or {}).get("train", {}))
    members = ckpt.get("members", 1)
    leaks = [
        {
            "kind": LEAKS[e["name"]][0],
            "key": LEAKS[e["name"]][1],
            "n_offending": e.get("details", {}).get("n_offending", "Some"),
        }
        for e in (validation or {}).get("expectations", [])
        if e.get("name") in LEAKS and not e.get("success")
    ]
    return {
        "model_id": mid,
        "synthetic": synthetic,
        "export": exp,
        "leaks": leaks,
        "data": {
            "data_version": manifest.get("data_version"),
            "content_hash": manifest.get("content_hash"),
            "n_images": manifest.get("n_images"),
            "n_unreadable": manifest.get("n_unreadable", 0),
            "split_method": (manifest.get("split") or {}).get("method", "unknown"),
        },
        "pretrained": {k: (ckpt.get("pretrained") or {}).get(k) for k in ("description", "name", "source", "sha256")},
        "train": train,
        "model": {
            "backbone": ckpt.get("backbone"),
            "epochs_run": ckpt.get("epochs_run"),
            "best_epoch": ckpt.get("best_epoch"),
            "best_metric": (ckpt.get("best_metric") or {}).get("name"),
            "members": members,
            "last_seed": (train["seed"] or 0) + members - 1,
        },
        "input": {k: meta.get(k) for k in ("channels", "image_size", "window", "equalize")}
        | {"resize": meta.get("resize", "as recorded")},
    }


def regression_values(ckpt: dict, metrics: dict, meta: dict) -> dict[str, Any]:
    """A regression card's values: the targets per split (preprocess's target_stats), the mean and std the
    graph applies, MAE/RMSE/R^2 with intervals and the gain over the linear probe."""
    stats = meta.get("target_stats") or {}
    return {
        "target": {"mean": ckpt["target_mean"], "std": ckpt["target_std"]},
        "splits": [
            {"name": s, **{k: (stats.get(s) or {}).get(k) for k in ("count", "mean", "std", "min", "max")}}
            for s in SPLITS
        ],
        "n_test": metrics.get("n_test"),
        "tta": metrics.get("tta", "none"),
        "rows": value_rows(metrics),
        "probe": value_probe(metrics),
    }


def _interval(record: dict, name: str) -> tuple[Any, Any]:
    """`name`'s interval from a record (`<name>_ci` [low, high], as evaluation.json holds it) or from the
    numbers of metrics.json (`<name>_ci_low`, `<name>_ci_high`); (None, None) when neither is there."""
    ci = record.get(f"{name}_ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return ci[0], ci[1]
    return record.get(f"{name}_ci_low"), record.get(f"{name}_ci_high")


def value_rows(metrics: dict) -> list[dict[str, Any]]:
    """A regression's test metrics (MAE, RMSE, R^2: those the record holds), each with its bootstrap interval."""
    rows = []
    for key, label in VALUE_METRICS:
        if metrics.get(key) is not None:
            low, high = _interval(metrics, key)
            rows.append({"key": key, "name": label, "value": metrics[key], "low": low, "high": high})
    return rows


def value_probe(metrics: dict) -> dict[str, Any] | None:
    """The gain from fine-tuning in a regression, in MAE: the model's and the probe's MAE, and mae_gain (probe
    minus model, > 0: fine-tuning helped) with its paired interval, from the record's `linear_probe` or
    metrics.json's flat probe_mae / mae_gain; None when neither holds a probe."""
    probe = metrics.get("linear_probe")
    if isinstance(probe, dict) and probe.get("mae_gain") is not None:
        src, own = probe, "mae" if "mae" in probe else "probe_mae"
        start, alpha = (probe.get("start") or {}).get("description"), probe.get("alpha")
    elif metrics.get("mae_gain") is not None:
        src, own, start, alpha = metrics, "probe_mae", None, None
    else:
        return None
    rows = [("fine-tuned (this model)", metrics, "mae"), ("linear probe", src, own)]
    g_lo, g_hi = _interval(src, "mae_gain")
    return {
        "start": start,
        "alpha": alpha,
        "rows": [
            {"name": n, "value": r.get(k), "low": _interval(r, k)[0], "high": _interval(r, k)[1]} for n, r, k in rows
        ],
        "gain": {"value": src["mae_gain"], "low": g_lo, "high": g_hi, "valid": src.get("mae_gain_bootstrap_valid")},
    }


def probe_rows(metrics: dict) -> dict[str, Any] | None:
    """The gain from fine-tuning (evaluate's `linear_probe`): the probe's start and fit, and one row per
    AUROC (fine-tuned, probe, gain) with its interval; None when the record has no probe."""
    probe = metrics.get("linear_probe")
    if not isinstance(probe, dict):
        return None
    start = probe.get("start") or {}

    def row(name: str, value: Any, ci: Any, how: str) -> dict[str, Any]:
        lo, hi = ci or (None, None)
        return {"name": name, "value": value, "low": lo, "high": hi, "how": how}

    return {
        "start": start.get("description"),
        "same_start": start.get("init") == start.get("model_start"),
        "C": probe.get("C"),
        "n_train": probe.get("n_train"),
        "rows": [
            row("fine-tuned (this model)", metrics["auroc"], metrics.get("auroc_ci"), "bootstrap"),
            row("linear probe", probe.get("auroc"), probe.get("auroc_ci"), "bootstrap"),
        ],
        "gain": row(
            "gain (fine-tuned - probe)",
            probe.get("auroc_gain"),
            probe.get("auroc_gain_ci"),
            f"paired bootstrap, {probe.get('auroc_gain_bootstrap_valid')} resamples",
        ),
    }


def interval_rows(metrics: dict) -> list[dict[str, Any]]:
    """Test metrics that are proportions, each with its 95% Wilson interval and the counts behind it."""
    classes, cm = metrics["classes"], np.asarray(metrics["confusion_matrix"])
    if len(classes) == 2:
        pos = classes.index(metrics["positive_class"])
        neg = 1 - pos
        counts = {
            "sensitivity": (cm[pos, pos], cm[pos].sum()),
            "specificity": (cm[neg, neg], cm[neg].sum()),
            "precision": (cm[pos, pos], cm[:, pos].sum()),
            "accuracy": (np.trace(cm), cm.sum()),
        }
    else:
        counts = {"accuracy": (np.trace(cm), cm.sum())}
    rows = []
    for name, (k, n) in counts.items():
        low, high = _wilson(int(k), int(n))
        rows.append({"name": name, "value": metrics[name], "k": int(k), "n": int(n), "low": low, "high": high})
    return rows


def _wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (sound for small test sets)."""
    if n == 0:
        return (float("nan"), float("nan"))
    z, p = 1.959964, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def synthetic_demo(raw_dir: Path, index_paths: Sequence[str]) -> bool:
    """True when the scans come from `medtune demo-data` (its StudyDescription says so)."""
    import pydicom

    for rel in list(index_paths)[:3]:
        path = raw_dir / rel
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyDescription"])
        except Exception:  # noqa: BLE001 - not DICOM or not there: we simply cannot tell
            continue
        if "synthetic demo" in str(ds.get("StudyDescription", "")):
            return True
    return False
