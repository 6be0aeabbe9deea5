"""Classification and regression metrics over arrays: the one definition that train (validation AUROC
every epoch), evaluate (the test metrics) and the retrain flow (the champion scored on the challenger's
test images) share.

    from components.model.metrics import auroc, compute_metrics, regression_metrics
    auroc(y_true, probs, positive_index)         # nan when a class is missing from y_true
    compute_metrics(y_true, probs, classes, positive_index, threshold, n_boot=1000, seed=0)
    regression_metrics(y_true, y_pred, n_boot=1000, seed=0)   # MAE, RMSE, R^2, each with its interval

Binary tasks score the positive class: AUROC on its probability, sensitivity / specificity /
precision / F1 of that class. Multi-class tasks average one-vs-rest per class (macro). Balanced
accuracy is the mean per-class recall in both cases. scikit-learn computes the numbers (F1 as
2 TP / (2 TP + FP + FN), from the counts); specificity, which it lacks, is read off its per-class
one-vs-rest confusion matrices, and the bootstrap interval is the percentiles of its AUROC over
resampled test sets. Regression (data.task): scikit-learn's mean absolute error, root mean squared
error and R^2, each with the percentile interval over the same resampled test sets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm

from components.model.decision import predict_labels

CI_LEVEL, CI_PERCENTILES = 0.95, (2.5, 97.5)  # the bootstrap interval of AUROC


def auroc(y_true: np.ndarray, probs: np.ndarray, positive_index: int) -> float:
    """Binary: AUROC of the positive class probability; multi-class: macro one-vs-rest.

    NaN when a class is missing from `y_true` (AUROC is undefined then): a validation split or a
    bootstrap resample can lack one, and the caller decides what that means.
    """
    k = probs.shape[1]
    if len(np.unique(y_true)) < k:
        return math.nan
    if k == 2:
        return float(skm.roc_auc_score((y_true == positive_index).astype(int), probs[:, positive_index]))
    return float(skm.roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=list(range(k))))


def bootstrap_auroc(
    y_true: np.ndarray, probs: np.ndarray, positive_index: int, n_boot: int, seed: int
) -> tuple[list[float | None], int]:
    """Percentile 95% interval of AUROC over test images resampled with replacement.

    Resamples that miss a class (AUROC undefined) are skipped; the number of valid ones is
    returned so a reader can tell a 1000-sample interval from a 12-sample one.
    """
    rng = np.random.default_rng(seed)
    n = len(y_true)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        value = auroc(y_true[idx], probs[idx], positive_index)
        if not math.isnan(value):
            values.append(value)
    if not values:
        return [None, None], 0
    lo, hi = np.percentile(values, CI_PERCENTILES)
    return [float(lo), float(hi)], len(values)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class, every class 0..k-1 present."""
    return skm.confusion_matrix(y_true, y_pred, labels=list(range(k)))


def per_class(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """One-vs-rest sensitivity (recall), specificity, precision and F1 of every class 0..k-1.

    A class never predicted has precision 0 and so F1 0 (zero_division=0: no warning, no nan).
    """
    labels = list(range(k))
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    # [[tn, fp], [fn, tp]] per class; tn + fp = the images not of that class.
    ovr = skm.multilabel_confusion_matrix(y_true, y_pred, labels=labels)
    tn, fp = ovr[:, 0, 0], ovr[:, 0, 1]
    specificity = np.divide(tn, tn + fp, out=np.zeros(k), where=(tn + fp) > 0)
    return {"sensitivity": recall, "specificity": specificity, "precision": precision, "f1": f1}


def _check(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], positive_index: int) -> None:
    """ValueError naming the problem unless probs is (N, K), labels are in 0..K-1 and every class occurs."""
    k = len(classes)
    if probs.ndim != 2 or probs.shape != (len(y_true), k):
        raise ValueError(
            f"probabilities have shape {probs.shape}; expected ({len(y_true)}, {k}) "
            f"for {len(y_true)} images and classes {list(classes)}."
        )
    if y_true.size and (y_true.min() < 0 or y_true.max() >= k):
        raise ValueError(f"labels {sorted(set(y_true.tolist()))} are outside 0..{k - 1} (classes {list(classes)}).")
    missing = [classes[i] for i in range(k) if not np.any(y_true == i)]
    if missing:
        raise ValueError(
            f"the test set has no images of class(es) {missing}; AUROC needs every class of "
            f"{list(classes)} in the test split (add data or change split.test_fraction)."
        )
    if not 0 <= positive_index < k:
        raise ValueError(f"positive_index {positive_index} is outside 0..{k - 1}.")


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    positive_index: int,
    threshold: float,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """All test metrics for class indices `y_true` (N,) and probabilities `probs` (N, K).

    Every class must occur in `y_true` (AUROC is undefined otherwise): ValueError if not.
    """
    y_true = np.asarray(y_true).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    _check(y_true, probs, classes, positive_index)
    k = len(classes)
    y_pred = predict_labels(probs, positive_index, threshold)
    scores = per_class(y_true, y_pred, k)
    if k == 2:  # the positive class's one-vs-rest row
        summary = {name: float(values[positive_index]) for name, values in scores.items()}
        averaging = f"binary, positive class {classes[positive_index]!r}"
    else:
        summary = {name: float(np.mean(values)) for name, values in scores.items()}
        averaging = "macro one-vs-rest (sensitivity, specificity, precision, F1, AUROC)"
    ci, n_valid = bootstrap_auroc(y_true, probs, positive_index, n_boot, seed)
    return {
        "auroc": auroc(y_true, probs, positive_index),
        "auroc_ci": ci,
        "auroc_ci_level": CI_LEVEL,
        "bootstrap_resamples": int(n_boot),
        "bootstrap_valid": n_valid,
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        # Mean recall over all classes (binary: (sensitivity + specificity) / 2): chance is 1/K
        # whatever the class balance, so a model calling everything one class scores 1/K here even
        # when its accuracy or one-class sensitivity looks good.
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        **{name: summary[name] for name in ("sensitivity", "specificity", "precision", "f1")},
        "n_test": int(len(y_true)),
        "confusion_matrix": confusion_matrix(y_true, y_pred, k).tolist(),
        "classes": list(classes),
        "positive_class": classes[positive_index] if k == 2 else None,
        "threshold": float(threshold) if k == 2 else None,
        "averaging": averaging,
    }


def _regression_arrays(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both as float64 (N,); ValueError naming the problem unless they are equally long, finite, N >= 1."""
    y_true, y_pred = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    if y_true.ndim != 1 or y_true.shape != y_pred.shape or len(y_true) == 0:
        raise ValueError(
            f"targets have shape {y_true.shape} and predictions {y_pred.shape}; expected two equal (N,) with N >= 1."
        )
    for name, values in (("targets", y_true), ("predictions", y_pred)):
        if not np.isfinite(values).all():
            raise ValueError(f"{name} hold {values[~np.isfinite(values)][0]}; expected finite numbers.")
    return y_true, y_pred


def _regression_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, np.ndarray]:
    """MAE, RMSE and R^2 of each column of (N, B) arrays (one resample a column), in one call each.
    R^2 is nan for a column whose targets are all equal (undefined: force_finite=False), or N < 2."""
    raw = {"multioutput": "raw_values"}
    r2 = np.full(y_true.shape[1], math.nan)
    if len(y_true) > 1:
        with np.errstate(divide="ignore", invalid="ignore"):  # the all-equal columns: nan, skipped
            r2 = skm.r2_score(y_true, y_pred, force_finite=False, **raw)
    return {
        "mae": skm.mean_absolute_error(y_true, y_pred, **raw),
        "rmse": np.sqrt(skm.mean_squared_error(y_true, y_pred, **raw)),
        "r2": r2,
    }


def regression_metrics(y_true: Any, y_pred: Any, n_boot: int, seed: int) -> dict[str, Any]:
    """MAE, RMSE and R^2 of predictions `y_pred` of targets `y_true` (both (N,), the target's unit),
    each with the percentile 95% interval over `n_boot` test sets resampled with replacement (the same
    resamples for all three, drawn as `bootstrap_auroc` draws them). R^2 is undefined (left None) on
    fewer than two images or targets all equal; resamples whose targets are all equal are skipped for
    R^2's interval (`bootstrap_valid` counts those kept)."""
    y_true, y_pred = _regression_arrays(y_true, y_pred)
    n = len(y_true)
    point = {k: float(v[0]) for k, v in _regression_scores(y_true[:, None], y_pred[:, None]).items()}
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.integers(0, n, size=n) for _ in range(n_boot)], axis=1) if n_boot else np.zeros((n, 0), int)
    resampled = _regression_scores(y_true[idx], y_pred[idx]) if n_boot else {k: np.zeros(0) for k in point}
    out: dict[str, Any] = {}
    for name, value in point.items():
        values = resampled[name][np.isfinite(resampled[name])]
        out[name] = value if math.isfinite(value) else None
        out[f"{name}_ci"] = [float(v) for v in np.percentile(values, CI_PERCENTILES)] if len(values) else [None, None]
    return {
        **out,
        "ci_level": CI_LEVEL,
        "bootstrap_resamples": int(n_boot),
        "bootstrap_valid": int(np.isfinite(resampled["r2"]).sum()),
        "n_test": int(n),
    }
