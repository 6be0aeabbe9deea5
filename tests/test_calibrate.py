"""Calibration and threshold choice on validation data: known answers, monotonicity, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from components.common import StageError
from components.model.calibrate import brier, calibrated_probabilities, choose_threshold, ece, fit_calibration
from components.params import parse_params


def overconfident(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Binary logits whose true probability is sigmoid(margin / 3): a model 3x too confident."""
    rng = np.random.default_rng(seed)
    margin = rng.normal(0, 4, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-margin / 3))).astype(int)
    return np.stack([np.zeros(n), margin], axis=1), y


def test_temperature_recovers_the_overconfidence_and_lowers_ece_and_brier():
    logits, y = overconfident()
    scale, bias = fit_calibration("temperature", logits, y, positive_index=1)
    assert scale == pytest.approx(1 / 3, rel=0.15) and bias == [0.0, 0.0]
    before, after = calibrated_probabilities(logits, 1.0, 0.0), calibrated_probabilities(logits, scale, bias)
    assert ece(y, after) < ece(y, before) / 2
    assert brier(y, after, 1) < brier(y, before, 1)
    # Monotone: the ranking, hence AUROC, is unchanged.
    assert roc_auc_score(y, after[:, 1]) == pytest.approx(roc_auc_score(y, before[:, 1]), abs=1e-12)


def test_platt_fits_slope_and_offset_on_the_margin():
    logits, y = overconfident(seed=1)
    # Shift: the model is also biased towards the positive class by 2 logits.
    shifted = logits + np.array([0.0, 2.0])
    scale, bias = fit_calibration("platt", shifted, y, positive_index=1)
    assert scale == pytest.approx(1 / 3, rel=0.15) and bias[0] == 0.0 and bias[1] == pytest.approx(-2 / 3, abs=0.15)
    # Positive class first: the bias lands on index 0.
    scale0, bias0 = fit_calibration("platt", shifted[:, ::-1], 1 - y, positive_index=0)
    assert scale0 == pytest.approx(scale) and bias0 == [pytest.approx(bias[1]), 0.0]


def test_none_is_the_identity_and_errors_are_clear():
    logits, y = overconfident(200)
    assert fit_calibration("none", logits, y, 1) == (1.0, [0.0, 0.0])
    with pytest.raises(StageError, match="needs both classes in the validation split"):
        fit_calibration("temperature", logits, np.ones_like(y), 1)
    with pytest.raises(StageError, match="'platt' is for two classes; this model has 3"):
        fit_calibration("platt", np.zeros((4, 3)), np.array([0, 1, 2, 0]), 1)
    with pytest.raises(StageError, match="fitted slope .* <= 0"):
        fit_calibration("platt", -logits, y, 1)  # a model that ranks backwards


def test_thresholds_chosen_on_known_scores():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.75, 0.6, 0.8, 0.9, 0.95])
    assert choose_threshold("fixed", y, s, 1, 0.5) == 0.5
    # Best Youden (and accuracy): 7/8 right with the cut between 0.3 and 0.6 or between 0.75 and 0.8;
    # the tie goes to the cut nearest 0.5.
    assert choose_threshold("youden", y, s, 1, 0.5) == pytest.approx(0.45)
    assert choose_threshold("accuracy", y, s, 1, 0.5) == pytest.approx(0.45)
    # Imbalanced: accuracy calls everything positive (8/10), Youden cuts above both negatives.
    y2 = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    s2 = np.array([0.3, 0.35, 0.1, 0.2, 0.32, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert choose_threshold("accuracy", y2, s2, 1, 0.5) == pytest.approx(0.05)
    assert choose_threshold("youden", y2, s2, 1, 0.5) == pytest.approx(0.425)
    with pytest.raises(StageError, match="needs both classes"):
        choose_threshold("youden", np.ones(3, int), np.array([0.1, 0.2, 0.3]), 1, 0.5)


def test_ece_and_brier_hand_computed():
    probs = np.array([[0.1, 0.9], [0.1, 0.9], [0.6, 0.4], [0.6, 0.4]])
    y = np.array([1, 0, 0, 0])
    # Bins: confidence 0.9 (accuracy 0.5) and 0.6 (accuracy 1.0), half the images each.
    assert ece(y, probs) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    assert brier(y, probs, 1) == pytest.approx((0.01 + 0.81 + 0.16 + 0.16) / 4)
    three = np.array([[1.0, 0, 0], [0, 0.5, 0.5]])
    assert brier(np.array([0, 1]), three, 0) == pytest.approx((0 + 0.5) / 2)


def test_every_method_params_allow_is_the_one_implemented():
    # fit_calibration and choose_threshold trust params.py for the method names (no fallback error of
    # their own): a name added to params must come with its implementation; an unknown one is refused.
    from typing import get_args

    from components.params import EvaluateParams

    logits, y = overconfident(400)
    fitted = {m: fit_calibration(m, logits, y, 1) for m in ("none", "temperature", "platt")}
    assert set(get_args(EvaluateParams.model_fields["calibration"].annotation)) == set(fitted)
    assert fitted["none"] == (1.0, [0.0, 0.0])
    assert (
        fitted["temperature"][1] == [0.0, 0.0] and fitted["platt"][1][1] != 0.0
    )  # platt: a bias on the positive class
    y2, s2 = np.array([0, 0, 1, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.9])
    chosen = {m: choose_threshold(m, y2, s2, 1, 0.3) for m in ("fixed", "youden", "accuracy")}
    assert set(get_args(EvaluateParams.model_fields["threshold_method"].annotation)) == set(chosen)
    # Cuts 0.25 and 0.5 both misclassify one image; the one nearer the default 0.3 wins.
    assert chosen["fixed"] == 0.3 and chosen["youden"] == chosen["accuracy"] == pytest.approx(0.25)
    for key, value in (("calibration", "isotonic"), ("threshold_method", "f1")):
        with pytest.raises(ValueError, match=rf"evaluate.{key} = '{value}' is invalid"):
            parse_params({"evaluate": {key: value}})
