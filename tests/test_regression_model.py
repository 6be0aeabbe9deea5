"""Regression (data.task: regression) on the model side: train learns a visible number (a square's
side), the checkpoint records the target's standardisation, evaluate writes its metrics, gate, scatter
plot, linear probe and Grad-CAM samples, and the metrics are scikit-learn's on hand-checked examples."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from components.common import StageError
from components.model.evaluate import apply_gate, evaluate, metrics_view
from components.model.metrics import regression_metrics
from components.model.models import Ensemble, load_checkpoint, n_outputs
from components.model.train import train
from components.model.warm_start import mismatches
from components.params import parse_params

SIZE = 32


def reg_params(train: dict | None = None, gate: dict | None = None, **evaluate_) -> object:
    """Regression params for tiny runs: a frozen ImageNet backbone under a fast-learning head."""
    return parse_params(
        {
            "data": {"task": "regression", "label_source": "csv"},
            "retrain": {"compare_metric": "mae"},
            "train": {
                "backbone": "efficientnet_lite0",
                "freeze": "head",
                "epochs": 3,
                "batch_size": 4,
                "lr": 0.01,
                "warmup_epochs": 0,
                **(train or {}),
            },
            "evaluate": {"bootstrap": 50, "explain_per_group": 1, "gate": gate or {}, **evaluate_},
        }
    )


def write_regression_prepared(root: Path, n=(32, 8, 12), seed: int = 0) -> Path:
    """data/prepared of a regression as preprocess writes it: each scan shows a bright square whose side
    in pixels is its target (a number plainly visible in the image), `target` a float column, meta's
    task "regression"."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, k in zip(("train", "val", "test"), n):
        t = rng.integers(4, 25, k).astype(float)
        images = rng.integers(0, 60, (k, 1, SIZE, SIZE)).astype(np.uint8)
        for image, side in zip(images, t.astype(int)):
            lo = (SIZE - side) // 2
            image[:, lo : lo + side, lo : lo + side] = 220
        np.save(root / f"{split}.npy", images)
        rows += [
            {
                "split": split,
                "row": i,
                "path": f"{split}/{i}.png",
                "sha256": f"{split}{i}".ljust(64, "0"),
                "label": repr(float(v)),
                "label_index": 0,
                "patient": f"{i:016x}",
                "target": float(v),
            }
            for i, v in enumerate(t)
        ]
    pd.DataFrame(rows).to_csv(root / "index.csv", index=False)
    meta = {"task": "regression", "classes": [], "image_size": SIZE, "channels": 1, "input": "uint8 NCHW"}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def trained(module_tmp):
    """One huber run (the default mse runs in the test of the losses) and its evaluation, under a
    max_mae gate no model passes."""
    root = module_tmp
    prepared = write_regression_prepared(root / "prepared")
    params = reg_params({"loss": "huber", "huber_delta": 1.0, "early_stopping_metric": "val_mae"}, {"max_mae": 0.001})
    summary = train(prepared, root / "model.pt", root / "train.json", root / "dvclive", params)
    result = evaluate(root / "model.pt", prepared, root / "reports", params)
    return root, prepared, summary, result


def test_training_learns_the_target_and_records_its_standardisation(trained):
    root, prepared, summary, result = trained
    ckpt = torch.load(root / "model.pt", weights_only=True)
    y = pd.read_csv(prepared / "index.csv").query("split == 'train'")["target"].to_numpy()
    assert ckpt["task"] == "regression" and ckpt["classes"] == []
    assert ckpt["target_mean"] == pytest.approx(y.mean()) and ckpt["target_std"] == pytest.approx(y.std())
    assert ckpt["state_dict"]["head.weight"].shape == (1, ckpt["state_dict"]["head.weight"].shape[1])
    assert ckpt["best_metric"]["name"] == "val_mae" and summary["selection_metric"] == "val_mae"
    rows = ckpt["history"]
    assert {"train_loss", "val_loss", "val_mae"} <= set(rows[0]) and "val_auroc" not in rows[0]
    assert summary["best_value"] == min(r["val_mae"] for r in rows)
    # Better than always predicting the train mean on held-out scans.
    assert result["metrics"]["r2"] > 0.3, result["metrics"]
    # DVCLive: val/mae per epoch, and the kept epoch's in the summary.
    mae = (root / "dvclive/plots/metrics/val/mae.tsv").read_text().splitlines()
    assert mae[0] == "step\tmae" and len(mae) == 1 + summary["epochs_run"]
    assert not (root / "dvclive/plots/metrics/val/auroc.tsv").exists()
    live = json.loads((root / "dvclive/metrics.json").read_text())
    assert live["val"]["mae"] == pytest.approx(summary["best_value"])


def test_evaluate_writes_metrics_gate_scatter_and_explanations(trained):
    root, prepared, _, result = trained
    reports = root / "reports"
    record = json.loads((reports / "evaluation.json").read_text())
    metrics = json.loads((reports / "metrics.json").read_text())
    assert record["task"] == "regression" and record["n_test"] == 12
    for name in ("mae", "rmse", "r2"):
        lo, hi = metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"]
        assert lo <= metrics[name] <= hi or name == "r2", (name, metrics)
    assert not {"auroc", "sensitivity", "threshold"} & set(metrics) and metrics_view(record) == metrics
    # The predictions, in the target's unit, give the recorded metrics.
    preds = pd.read_csv(reports / "test_predictions.csv")
    assert list(preds.columns) == ["path", "sha256", "target", "predicted"]
    assert metrics["mae"] == pytest.approx(np.abs(preds["predicted"] - preds["target"]).mean(), abs=1e-5)
    scatter = pd.read_csv(reports / "scatter.csv")
    assert list(scatter.columns) == ["true", "predicted"] and len(scatter) == 12
    np.testing.assert_allclose(scatter["true"], preds["target"])
    assert "test/" not in (reports / "scatter.csv").read_text()  # no paths
    # The linear probe: a ridge head on the frozen starting backbone; the gain is probe minus model.
    probe = record["linear_probe"]
    assert probe["head"].startswith("ridge") and probe["alpha"] in probe["alpha_grid"]
    assert probe["fine_tuned_mae"] == pytest.approx(record["mae"])
    assert metrics["mae_gain"] == pytest.approx(probe["mae"] - record["mae"]) and metrics["probe_mae"] == probe["mae"]
    assert metrics["mae_gain_ci_low"] <= metrics["mae_gain_ci_high"]
    # The outputs dvc.yaml declares for both tasks exist; the classification ones are empty.
    assert pd.read_csv(reports / "roc.csv").empty and pd.read_csv(reports / "confusion.csv").empty
    assert (reports / "roc.png").read_bytes()[:4] == b"\x89PNG"
    index = json.loads((reports / "explanations/index.json").read_text())
    assert [i["group"] for i in index["images"]] == ["largest-error", "smallest-error"]
    errors = (preds["predicted"] - preds["target"]).abs()
    assert abs(index["images"][0]["error"]) == pytest.approx(errors.max(), abs=1e-5)
    assert all((reports / "explanations" / i["file"]).is_file() for i in index["images"])


def test_the_gate_fails_on_a_tiny_max_mae(trained):
    root, _, _, result = trained
    gate = json.loads((root / "reports/gate.json").read_text())
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert gate == result["gate"] and gate["thresholds"] == {"min_r2": 0.0, "max_mae": 0.001}
    assert not gate["passed"] and gate["failed"] == [f"mae {round(metrics['mae'], 4)} > max_mae 0.001"]
    assert gate["reasons"] == [f"r2 {round(metrics['r2'], 4)} >= min_r2 0.0", gate["failed"][0]]
    assert gate["metrics"] == {"r2": metrics["r2"], "mae": metrics["mae"]}


def test_mse_with_mixup_trains_and_classification_params_refuse_the_model(tmp_path):
    prepared = write_regression_prepared(tmp_path / "prepared", n=(8, 4, 4))
    params = reg_params({"loss": "mse", "epochs": 1, "mixup_alpha": 0.4, "batch_size": 4, "ensemble": 2})
    summary = train(prepared, tmp_path / "model.pt", tmp_path / "train.json", tmp_path / "live", params)
    assert summary["selection_metric"] == "val_loss" and all(math.isfinite(v) for v in summary["best_value"])
    # An ensemble's members average their one output; its own validation is a regression's.
    assert set(summary["ensemble_val"]) == {"val_loss", "val_mae"}
    model, ckpt = load_checkpoint(tmp_path / "model.pt")
    assert isinstance(model, Ensemble) and model.num_classes == 1 and n_outputs(ckpt) == 1
    # A regression champion cannot warm-start a classification run, nor the reverse.
    assert mismatches(ckpt, [], 1, SIZE, ckpt["backbone"], 2, "classification") == [
        "task 'regression' (this run: 'classification')"
    ]
    assert mismatches(ckpt, [], 1, SIZE, ckpt["backbone"], 2, "regression") == []
    with pytest.raises(StageError, match="is a regression model, but params data.task is classification"):
        evaluate(tmp_path / "model.pt", prepared, tmp_path / "reports", parse_params({}))
    with pytest.raises(StageError, match="has task 'regression', but params data.task is 'classification'"):
        train(prepared, tmp_path / "c.pt", tmp_path / "c.json", tmp_path / "c", parse_params({}))


def test_a_target_that_is_not_a_number_is_named(tmp_path):
    prepared = write_regression_prepared(tmp_path / "prepared", n=(4, 2, 2))
    index = pd.read_csv(prepared / "index.csv")
    index.loc[3, "target"] = float("nan")
    index.to_csv(prepared / "index.csv", index=False)
    with pytest.raises(StageError, match=r"index.csv: train row 3 \(train/3.png\) has target .*a finite number"):
        train(prepared, tmp_path / "m.pt", tmp_path / "t.json", tmp_path / "l", reg_params())


def test_regression_metrics_are_sklearns_with_intervals_over_shared_resamples():
    y, p = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.5, 2.0, 2.5, 5.0])
    m = regression_metrics(y, p, n_boot=200, seed=0)
    # By hand: errors 0.5, 0, 0.5, 1 -> MAE 0.5, MSE 1.5 / 4; SS_res 1.5, SS_tot 5 -> R^2 0.7.
    assert m["mae"] == pytest.approx(0.5) and m["rmse"] == pytest.approx(math.sqrt(0.375))
    assert m["r2"] == pytest.approx(0.7) and m["n_test"] == 4 and m["bootstrap_resamples"] == 200
    # The resamples bootstrap_auroc draws; R^2 skips those whose four targets are one value.
    rng = np.random.default_rng(0)
    idx = [rng.integers(0, 4, size=4) for _ in range(200)]
    maes = [np.abs(y[i] - p[i]).mean() for i in idx]
    assert m["mae_ci"] == pytest.approx(list(np.percentile(maes, (2.5, 97.5))))
    assert m["bootstrap_valid"] == sum(len(set(i.tolist())) > 1 for i in idx)
    # R^2 is undefined for targets all equal; MAE and RMSE are not.
    flat = regression_metrics([2.0, 2.0], [1.0, 3.0], n_boot=10, seed=0)
    assert flat["r2"] is None and flat["r2_ci"] == [None, None] and flat["mae"] == 1.0
    with pytest.raises(ValueError, match="expected finite numbers"):
        regression_metrics([1.0, np.inf], [1.0, 2.0], n_boot=0, seed=0)


def test_each_task_checks_only_its_own_gates():
    reg = reg_params(gate={"min_r2": 0.5, "max_mae": 2.0})
    assert apply_gate({"r2": 0.6, "mae": 1.5, "auroc": 0.1}, reg)["passed"]
    bad = apply_gate({"r2": 0.4, "mae": 2.5}, reg)
    assert bad["failed"] == ["r2 0.4 < min_r2 0.5", "mae 2.5 > max_mae 2.0"]
    assert apply_gate({"mae": 1.0}, reg)["failed"] == ["r2 is undefined; needs >= min_r2 0.5"]
    cls = apply_gate(
        {"auroc": 0.9, "sensitivity": 0.8, "specificity": 0.7, "balanced_accuracy": 0.75}, parse_params({})
    )
    assert cls["passed"] and set(cls["thresholds"]) == {
        "min_auroc",
        "min_sensitivity",
        "min_specificity",
        "min_balanced_accuracy",
    }
