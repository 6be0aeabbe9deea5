"""Evaluate stage: metrics against hand-computed values, the gate, and the stage on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import precision_score, recall_score, roc_auc_score

from components.evaluate import apply_gate, compute_metrics, predict_labels
from components.params import parse_params

BINARY = ["normal", "lesion"]


def binary_probs(p_pos):
    p_pos = np.asarray(p_pos, dtype=float)
    return np.stack([1 - p_pos, p_pos], axis=1)


def test_perfect_classifier_auroc_one_with_degenerate_interval():
    y = np.array([0, 0, 0, 1, 1, 1])
    m = compute_metrics(y, binary_probs([0.1, 0.2, 0.3, 0.7, 0.8, 0.9]), BINARY, 1, 0.5, n_boot=200, seed=0)
    assert m["auroc"] == 1.0
    assert m["auroc_ci"] == [1.0, 1.0]
    assert m["accuracy"] == m["sensitivity"] == m["specificity"] == m["precision"] == m["f1"] == 1.0
    assert m["confusion_matrix"] == [[3, 0], [0, 3]]
    assert 0 < m["bootstrap_valid"] <= 200


def test_known_confusion_matrix_and_hand_computed_metrics():
    y = np.array([0, 0, 0, 0, 1, 1])
    probs = binary_probs([0.1, 0.7, 0.2, 0.3, 0.8, 0.4])
    m = compute_metrics(y, probs, BINARY, 1, 0.5, n_boot=0, seed=0)
    # predictions at 0.5: [0, 1, 0, 0, 1, 0] -> TN 3, FP 1, FN 1, TP 1
    assert m["confusion_matrix"] == [[3, 1], [1, 1]]
    assert m["sensitivity"] == pytest.approx(1 / 2)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(1 / 2)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # positive scores {0.8, 0.4} beat negatives {0.1, 0.7, 0.2, 0.3}: 0.8 beats 4, 0.4 beats 3 -> 7/8
    assert m["auroc"] == pytest.approx(7 / 8)
    assert m["n_test"] == 6 and m["positive_class"] == "lesion" and m["threshold"] == 0.5
    assert m["auroc_ci"] == [None, None] and m["bootstrap_valid"] == 0

    # A lower threshold catches the second lesion.
    m2 = compute_metrics(y, probs, BINARY, 1, 0.35, n_boot=0, seed=0)
    assert m2["confusion_matrix"] == [[3, 1], [0, 2]]
    assert m2["sensitivity"] == 1.0


def test_positive_class_first_is_respected():
    classes = ["lesion", "normal"]  # positive index 0
    y = np.array([0, 0, 1, 1, 1])
    p_lesion = np.array([0.9, 0.4, 0.2, 0.6, 0.1])
    probs = np.stack([p_lesion, 1 - p_lesion], axis=1)
    assert predict_labels(probs, 0, 0.5).tolist() == [0, 1, 1, 0, 1]
    m = compute_metrics(y, probs, classes, 0, 0.5, n_boot=0, seed=0)
    assert m["sensitivity"] == pytest.approx(1 / 2)  # 1 of 2 lesions
    assert m["specificity"] == pytest.approx(2 / 3)  # 2 of 3 normals
    assert m["auroc"] == pytest.approx(roc_auc_score(y == 0, p_lesion))


def test_multiclass_macro_matches_sklearn():
    rng = np.random.default_rng(1)
    y = np.array([0, 1, 2] * 6)
    probs = rng.dirichlet([1, 1, 1], size=len(y))
    probs[np.arange(len(y)), y] += 0.3  # better than chance, not perfect
    probs /= probs.sum(axis=1, keepdims=True)
    m = compute_metrics(y, probs, ["a", "b", "c"], 2, 0.5, n_boot=50, seed=3)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    pred = probs.argmax(axis=1)
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred, average="macro"))
    assert m["precision"] == pytest.approx(precision_score(y, pred, average="macro", zero_division=0))
    assert "macro" in m["averaging"] and m["positive_class"] is None
    assert np.trace(np.array(m["confusion_matrix"])) == (pred == y).sum()
    lo, hi = m["auroc_ci"]
    assert lo <= m["auroc"] <= hi


def test_bootstrap_is_seeded_and_skips_one_class_resamples():
    y = np.array([0, 1, 0, 1])
    probs = binary_probs([0.2, 0.6, 0.7, 0.9])
    a = compute_metrics(y, probs, BINARY, 1, 0.5, n_boot=300, seed=7)
    b = compute_metrics(y, probs, BINARY, 1, 0.5, n_boot=300, seed=7)
    assert a["auroc_ci"] == b["auroc_ci"]
    # With 4 images, P(all one class) = 2/16, so some resamples must have been skipped.
    assert 200 < a["bootstrap_valid"] < 300


def test_missing_class_and_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="no images of class"):
        compute_metrics(np.array([0, 0]), binary_probs([0.1, 0.2]), BINARY, 1, 0.5, 0, 0)
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(np.array([0, 1]), np.ones((2, 3)) / 3, BINARY, 1, 0.5, 0, 0)


def test_gate_reasons_for_pass_and_fail():
    params = parse_params({"evaluate": {"gate": {"min_auroc": 0.75, "min_sensitivity": 0.6,
                                                 "min_specificity": 0.5}}})
    ok = apply_gate({"auroc": 0.9, "sensitivity": 0.8, "specificity": 0.7}, params)
    assert ok["passed"] and ok["failed"] == [] and len(ok["reasons"]) == 3
    assert ok["thresholds"] == {"min_auroc": 0.75, "min_sensitivity": 0.6, "min_specificity": 0.5}

    bad = apply_gate({"auroc": 0.62, "sensitivity": 0.8, "specificity": 0.4}, params)
    assert not bad["passed"]
    assert "auroc 0.62 < min_auroc 0.75" in bad["reasons"]
    assert bad["failed"] == ["auroc 0.62 < min_auroc 0.75", "specificity 0.4 < min_specificity 0.5"]
    assert bad["metrics"] == {"auroc": 0.62, "sensitivity": 0.8, "specificity": 0.4}
    json.dumps(bad)
