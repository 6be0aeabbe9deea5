"""components/model/metrics.py: the metrics against hand-computed values and scikit-learn, the
edge cases (a class never predicted, a class missing), and the bootstrap interval."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, precision_score, recall_score, roc_auc_score

from components.model.decision import predict_labels
from components.model.metrics import auroc, bootstrap_auroc, compute_metrics, confusion_matrix, per_class

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
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 3 / 4) / 2)
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
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
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


def test_auroc_is_nan_when_a_class_is_missing_and_sklearns_otherwise():
    y = np.array([0, 1, 1, 0, 1])
    p = binary_probs([0.2, 0.9, 0.4, 0.5, 0.6])
    assert auroc(y, p, 1) == roc_auc_score(y, p[:, 1])
    assert auroc(y, p, 0) == roc_auc_score(y == 0, p[:, 0])
    assert np.isnan(auroc(np.ones(4, int), binary_probs([0.1, 0.2, 0.3, 0.4]), 1))
    y3 = np.array([0, 1, 2, 0, 1, 2])
    p3 = np.random.default_rng(0).dirichlet([1, 1, 1], size=6)
    assert auroc(y3, p3, 2) == roc_auc_score(y3, p3, multi_class="ovr", average="macro")
    assert np.isnan(auroc(np.array([0, 1, 0, 1]), p3[:4], 2))  # class 2 missing


def counts(y_true, y_pred, k):
    """One-vs-rest (tp, fp, fn, tn) of every class, counted image by image."""
    rows = []
    for c in range(k):
        tp = sum(t == c and p == c for t, p in zip(y_true, y_pred))
        fp = sum(t != c and p == c for t, p in zip(y_true, y_pred))
        fn = sum(t == c and p != c for t, p in zip(y_true, y_pred))
        rows.append((tp, fp, fn, len(y_true) - tp - fp - fn))
    return rows


@pytest.mark.parametrize("k", [2, 3, 5])
def test_per_class_scores_are_the_count_formulas(k):
    rng = np.random.default_rng(k)
    y_true = np.concatenate([np.arange(k), rng.integers(0, k, 40)])
    y_pred = np.where(rng.random(len(y_true)) < 0.6, y_true, rng.integers(0, k, len(y_true)))
    scores = per_class(y_true, y_pred, k)
    for c, (tp, fp, fn, tn) in enumerate(counts(y_true, y_pred, k)):
        assert scores["sensitivity"][c] == tp / (tp + fn)
        assert scores["specificity"][c] == tn / (tn + fp)
        assert scores["precision"][c] == (tp / (tp + fp) if tp + fp else 0.0)
        # F1 from the counts (scikit-learn's formula), not from the rounded precision and recall.
        assert scores["f1"][c] == 2 * tp / (2 * tp + fp + fn)
    cm = confusion_matrix(y_true, y_pred, k)
    assert cm.shape == (k, k) and cm.sum() == len(y_true)
    assert all(cm[t, p] == np.sum((y_true == t) & (y_pred == p)) for t in range(k) for p in range(k))


def test_a_class_never_predicted_scores_zero_precision_and_f1_without_a_warning():
    # Every image called class 0: classes 1 and 2 have no predicted images (0 / 0 precision).
    y_true = np.array([0, 1, 2, 0, 1, 2])
    y_pred = np.zeros(6, dtype=int)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sklearn's UndefinedMetricWarning would fail here
        scores = per_class(y_true, y_pred, 3)
    assert scores["precision"].tolist() == [2 / 6, 0.0, 0.0]
    assert scores["f1"].tolist() == [2 * 2 / (2 * 2 + 4 + 0), 0.0, 0.0]
    assert scores["sensitivity"].tolist() == [1.0, 0.0, 0.0]
    assert scores["specificity"].tolist() == [0.0, 1.0, 1.0]
    # A predicted class that occurs nowhere in y_true still gets its column in the matrix.
    assert confusion_matrix(np.array([0, 0, 1]), np.array([0, 2, 1]), 3).tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]


def test_the_interval_is_the_percentiles_of_the_valid_resamples():
    y = np.array([0, 1, 0, 1, 1])  # 5 images: about 1 resample in 11 holds one class only
    probs = binary_probs([0.2, 0.6, 0.7, 0.9, 0.4])
    (lo, hi), n_valid = bootstrap_auroc(y, probs, 1, n_boot=100, seed=5)
    rng, values = np.random.default_rng(5), []
    for _ in range(100):  # the same draws, replayed
        idx = rng.integers(0, len(y), size=len(y))
        if len(np.unique(y[idx])) == 2:
            values.append(roc_auc_score(y[idx], probs[idx, 1]))
    assert n_valid == len(values) < 100
    assert [lo, hi] == np.percentile(values, [2.5, 97.5]).tolist()
    assert bootstrap_auroc(y, probs, 1, n_boot=0, seed=5) == ([None, None], 0)
