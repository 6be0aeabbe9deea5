"""The gain from fine-tuning for a regression model (data.task: regression): the model against a ridge
regression on its starting backbone's frozen features.

    from components.model.probe_regression import regression_probe
    record = regression_probe(ckpt, "data/prepared", params, y_test, model_pred)   # evaluation.json's linear_probe

The backbone and its features are the classification probe's (components/model/probe.py: the same
starting weights, frozen, the model's test-time augmentation on val and test). The head is scikit-learn's
Ridge on standardised features, fitted on the train split's targets, its alpha chosen on the validation
split's mean absolute error (ties to the larger alpha, the stronger regularisation); the test split is
scored once the head is fixed. The record holds the probe's test MAE, RMSE and R^2 and the MAE gain,
probe minus fine-tuned (above 0: fine-tuning helped), with a paired bootstrap interval: both models
scored on the same resampled test images, drawn as metrics.regression_metrics draws them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import Ridge
from sklearn.metrics import mean_absolute_error
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from components.model.metrics import CI_LEVEL, regression_metrics
from components.model.models import pick_device
from components.model.probe import features, percentile_interval, probe_backbone
from components.model.targets import targets
from components.params import Params

log = logging.getLogger("medtune.probe")

ALPHA_GRID = tuple(float(a) for a in np.logspace(-2, 4, 7))  # the head's L2 strength, chosen on val


def fit_ridge(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray
) -> tuple[Pipeline, float, float]:
    """The ridge head on standardised train features with the alpha of ALPHA_GRID of least val MAE;
    (head, alpha, val MAE)."""
    best: tuple[float, Pipeline, float] | None = None
    for alpha in reversed(ALPHA_GRID):  # strongest first, so a tie keeps it
        head = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(x_train, y_train)
        mae = float(mean_absolute_error(y_val, head.predict(x_val)))
        if best is None or mae < best[0]:
            best = (mae, head, alpha)
    mae, head, alpha = best
    return head, alpha, mae


def mae_gain(y_true: np.ndarray, model_pred: np.ndarray, probe_pred: np.ndarray, n_boot: int, seed: int) -> dict:
    """Probe MAE minus the model's on the test split and over `n_boot` paired resamples (the indices
    regression_metrics draws): {mae_gain, mae_gain_ci, probe_mae_ci, bootstrap_valid}."""
    n, rng = len(y_true), np.random.default_rng(seed)
    idx = np.stack([rng.integers(0, n, size=n) for _ in range(n_boot)]) if n_boot else np.zeros((0, n), int)
    model_mae = np.abs(model_pred[idx] - y_true[idx]).mean(axis=1)
    probe_mae = np.abs(probe_pred[idx] - y_true[idx]).mean(axis=1)
    gain = float(mean_absolute_error(y_true, probe_pred) - mean_absolute_error(y_true, model_pred))
    return {
        "mae_gain": gain,
        "mae_gain_ci": percentile_interval(probe_mae - model_mae),
        "probe_mae_ci": percentile_interval(probe_mae),
        "bootstrap_valid": int(n_boot),
    }


def regression_probe(
    ckpt: dict[str, Any],
    prepared_dir: str | Path,
    params: Params,
    y_test: np.ndarray,
    model_pred: np.ndarray,
    device: Any = None,
) -> dict[str, Any]:
    """evaluation.json's `linear_probe` of a regression: how the probe was built and fitted, its test
    metrics, the fine-tuned model's MAE (`model_pred`, its test predictions in the target's unit) and
    the MAE gain over the probe with its paired bootstrap interval."""
    from components.data.preprocess import load_split

    prepared_dir, ev = Path(prepared_dir), params.evaluate
    device = device or pick_device()
    net, start = probe_backbone(ckpt, ev.seed)
    split = {}
    for name, tta in (("train", "none"), ("val", ev.tta)):
        images, index = load_split(prepared_dir, name)
        split[name] = (features(net, images, device, tta), targets(prepared_dir, index, name))
    head, alpha, val_mae = fit_ridge(*split["train"], *split["val"])
    test_images, _ = load_split(prepared_dir, "test")
    probe_pred = head.predict(features(net, test_images, device, ev.tta))
    y_test, model_pred = np.asarray(y_test, np.float64), np.asarray(model_pred, np.float64)
    metrics = regression_metrics(y_test, probe_pred, 0, ev.seed)
    gain = mae_gain(y_test, model_pred, probe_pred, ev.bootstrap, ev.seed)
    record = {
        "start": start,
        "head": "ridge regression on standardised pooled features",
        "fitted_on": "train",
        "alpha": alpha,
        "alpha_grid": list(ALPHA_GRID),
        "alpha_chosen_on": "val",
        "val_mae": val_mae,
        "n_features": int(split["train"][0].shape[1]),
        "n_train": len(split["train"][1]),
        "n_val": len(split["val"][1]),
        "tta": ev.tta,
        **{k: metrics[k] for k in ("mae", "rmse", "r2", "n_test")},
        "mae_ci": gain["probe_mae_ci"],
        "fine_tuned_mae": float(mean_absolute_error(y_test, model_pred)),
        "mae_gain": gain["mae_gain"],
        "mae_gain_ci": gain["mae_gain_ci"],
        "mae_gain_ci_level": CI_LEVEL,
        "mae_gain_bootstrap_valid": gain["bootstrap_valid"],
    }
    lo, hi = record["mae_gain_ci"]
    log.info(
        "linear probe (%s, frozen; ridge alpha=%g chosen on val): test mae=%.4g; fine-tuned %.4g; "
        "gain %+.4g (probe minus model, 95%% CI %s, paired bootstrap)",
        start["description"],
        alpha,
        record["mae"],
        record["fine_tuned_mae"],
        record["mae_gain"],
        f"{lo:+.4g} to {hi:+.4g}" if lo is not None else "n/a",
    )
    return record
