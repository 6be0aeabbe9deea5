"""The decision rule: from class probabilities to a predicted class, the same in evaluate's test
metrics, in train's validation metrics and in `medtune predict` with the shipped threshold. numpy only,
so `medtune predict` pays for nothing else.
"""

from __future__ import annotations

import numpy as np


def predict_labels(probs: np.ndarray, positive_index: int, threshold: float) -> np.ndarray:
    """Binary: positive class iff its probability >= threshold; multi-class: argmax. The one
    decision rule of evaluate (test metrics) and predict (the shipped model's threshold)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape[1] == 2:
        return np.where(probs[:, positive_index] >= threshold, positive_index, 1 - positive_index)
    return probs.argmax(axis=1)
