"""Calibration and operating point, fitted on the validation split (never on test).

Pure functions over numpy arrays, used by the evaluate stage:

    scale, bias = fit_calibration("temperature", val_logits, y_val, positive_index)
    probs = calibrated_probabilities(test_logits, scale, bias)
    threshold = choose_threshold("youden", y_val, val_probs[:, pos], pos)
    ece(y_test, probs), brier(y_test, probs, pos)

Every calibration is the affine map `logits * scale + bias` before the softmax:
- temperature (Guo et al. 2017): scale = 1 / T, bias = 0; one parameter, any number of classes.
- platt (binary): p(positive) = sigmoid(a * (z_pos - z_neg) + b), i.e. scale = a and bias = b on
  the positive class. `models.Deployed` applies the same map inside the exported ONNX graph.
Both are monotone in the positive-class score, so they never change AUROC.
"""

from __future__ import annotations

import numpy as np

from components.common import StageError

# scipy (a third of a second to import) only inside the functions that fit or transform.

ECE_BINS = 15  # as in Guo et al.; equal-width bins over the top-label confidence


def calibrated_probabilities(logits: np.ndarray, scale: float, bias: list[float] | np.ndarray) -> np.ndarray:
    from scipy.special import softmax

    return softmax(np.asarray(logits, np.float64) * scale + np.asarray(bias, np.float64), axis=1)


def fit_calibration(method: str, logits: np.ndarray, y: np.ndarray, positive_index: int) -> tuple[float, list[float]]:
    """(scale, bias) fitted by maximum likelihood on (logits, y); (1, zeros) for method "none"."""
    logits, y = np.asarray(logits, np.float64), np.asarray(y, np.int64)
    k = logits.shape[1]
    if method == "none":
        return 1.0, [0.0] * k
    if len(np.unique(y)) < 2:
        raise StageError(
            f"evaluate.calibration = {method!r} needs both classes in the validation split; it holds "
            f"only class index {sorted(set(y.tolist()))} ({len(y)} images). Use calibration: none or "
            "a larger split.val_fraction."
        )
    if method == "temperature":
        return _fit_temperature(logits, y), [0.0] * k
    return _fit_platt(logits, y, positive_index)  # "platt": params.py allows no other method


def _fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """scale = 1 / T minimising the negative log-likelihood of softmax(logits / T)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    def nll(log_t: float) -> float:
        return -float(log_softmax(logits / np.exp(log_t), axis=1)[np.arange(len(y)), y].mean())

    # T in [e^-4, e^4]: wide enough for any real model, bounded so a separable split stays finite.
    log_t = minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded").x
    return float(np.exp(-log_t))


def _fit_platt(logits: np.ndarray, y: np.ndarray, positive_index: int) -> tuple[float, list[float]]:
    """(a, bias with b on the positive class) of p(positive) = sigmoid(a * (z_pos - z_neg) + b)."""
    k = logits.shape[1]
    if k != 2:  # params.py refuses platt for other than two data.classes; these logits may still differ
        raise StageError(f"evaluate.calibration = 'platt' is for two classes; this model has {k}. Use 'temperature'.")
    from sklearn.linear_model import LogisticRegression

    margin = (logits[:, positive_index] - logits[:, 1 - positive_index]).reshape(-1, 1)
    # Large C: Platt's method is (nearly) unregularised maximum likelihood.
    fit = LogisticRegression(C=1e4).fit(margin, (y == positive_index).astype(int))
    a, b = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    if a <= 0:
        raise StageError(
            f"Platt scaling on the validation split fitted slope {a:.4g} <= 0: the model ranks "
            "validation images no better than chance, so calibrating it would invert or flatten "
            "its scores. Use calibration: temperature or none, or improve the model."
        )
    bias = [0.0, 0.0]
    bias[positive_index] = b
    return a, bias


def choose_threshold(method: str, y: np.ndarray, scores: np.ndarray, positive_index: int, default: float) -> float:
    """Binary threshold on the positive-class probability `scores` (rule: positive iff score >= t).

    "fixed" returns `default`; "youden" maximises sensitivity + specificity - 1 and "accuracy" the
    accuracy over the observed scores, ties going to the threshold nearest `default`. The result is
    the midpoint between two neighbouring observed scores, so it does not sit on a validation image.
    """
    if method == "fixed":
        return float(default)
    pos = np.asarray(y) == positive_index
    s = np.asarray(scores, np.float64)
    if pos.all() or not pos.any():
        raise StageError(
            f"evaluate.threshold_method = {method!r} needs both classes in the validation split; "
            f"it holds {int(pos.sum())} positive of {len(pos)} images."
        )
    values = np.unique(s)
    # Candidates between neighbouring scores (and just outside both ends).
    cuts = np.concatenate([[values[0] / 2], (values[:-1] + values[1:]) / 2, [(values[-1] + 1) / 2]])
    predicted = s[None, :] >= cuts[:, None]  # (candidates, images)
    tp = (predicted & pos).sum(1)
    tn = (~predicted & ~pos).sum(1)
    if method == "youden":
        score = tp / pos.sum() + tn / (~pos).sum() - 1
    else:  # "accuracy", the one method left that params.py allows (evaluate.threshold_method)
        score = (tp + tn) / len(s)
    best = np.flatnonzero(np.isclose(score, score.max()))
    return float(cuts[best[np.argmin(np.abs(cuts[best] - default))]])


def ece(y: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-label confidence, equal-width bins (Guo et al. 2017)."""
    probs = np.asarray(probs, np.float64)
    conf, correct = probs.max(1), probs.argmax(1) == np.asarray(y)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def brier(y: np.ndarray, probs: np.ndarray, positive_index: int) -> float:
    """Binary: mean (p(positive) - 1[positive])^2; multi-class: mean squared distance to the one-hot label."""
    probs, y = np.asarray(probs, np.float64), np.asarray(y)
    if probs.shape[1] == 2:
        return float(np.mean((probs[:, positive_index] - (y == positive_index)) ** 2))
    return float(np.mean(np.sum((probs - np.eye(probs.shape[1])[y]) ** 2, axis=1)))


def calibration_report(y: np.ndarray, before: np.ndarray, after: np.ndarray, positive_index: int) -> dict[str, float]:
    return {
        "ece_before": ece(y, before),
        "ece_after": ece(y, after),
        "brier_before": brier(y, before, positive_index),
        "brier_after": brier(y, after, positive_index),
    }
