"""Stage 6: score the trained model on the held-out test split, plot it, and apply the gate.

    medtune evaluate            # models/model.pt + data/prepared -> reports/
    dvc repro evaluate

Writes `reports/evaluation.json` (the whole evaluation record: metrics, classes, positive class,
confusion matrix, calibration, bootstrap counts), `reports/metrics.json` (its numbers that a person
compares between runs, and nothing else: what `dvc metrics` and `dvc exp show` list; see
`metrics_view`), `reports/gate.json`, `reports/roc.csv`, `reports/confusion.csv`,
`reports/test_predictions.csv`, `reports/roc.png`, `reports/confusion.png` and `reports/explanations/`
(Grad-CAM overlays of a few test images per outcome, components/model/explain.py). All are DVC-cached
and byte-reproducible, so `dvc metrics diff`, `dvc plots diff` and `dvc exp show` find them at any
revision. A failed gate is *not* a stage failure: the numbers stay on disk (and in dvc.lock) for
review, and the export stage is the one that refuses to ship the model.

Before the test split is touched, the validation split fixes the operating point: probability
calibration (`evaluate.calibration`) and, with `evaluate.threshold_method`, the binary threshold;
`evaluate.tta` adds test-time augmentation. metrics.json records all three, with ECE and Brier
score before and after calibration on both splits, and export bakes them into the ONNX graph.
With `evaluate.linear_probe` the record's `linear_probe` compares the model with its starting backbone,
frozen, under a fitted linear head: the gain from fine-tuning (components/model/probe.py).

Binary tasks score the positive class (`evaluate.positive_class`, default the last class): AUROC on
its probability, predicted label = probability >= the threshold. Multi-class tasks use
argmax, macro one-vs-rest AUROC / sensitivity / specificity / precision / F1, and the ROC curve
written to roc.csv is the micro-average (every class's one-vs-rest scores pooled). Balanced
accuracy is the mean per-class recall in both cases. components/model/metrics.py computes them
(with scikit-learn); this module adds the operating point, the gate, the reports and the plots.
reports/scatter.csv, a regression's plot, is only its header for a classifier.

Regression (`data.task: regression`, `evaluate_regression`): the one output in the target's unit,
MAE, RMSE and R^2 with bootstrap intervals, the gates min_r2 and max_mae, predicted vs true in
reports/scatter.csv; no operating point (components/model/regression_eval.py, docs/regression.md).
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from components.common import StageError, atomic_path, read_json, sha256_file, stage_main, write_json
from components.model import calibrate
from components.model.decision import predict_labels
from components.model.gate import apply_gate, log_gate
from components.model.metrics import auroc, compute_metrics
from components.params import Params, load_params
from components.plots import figure, save_png

log = logging.getLogger("medtune.evaluate")

BATCH_SIZE = 64  # inference only; does not change the results
RECORD, METRICS = "evaluation.json", "metrics.json"  # in the reports folder
EXPLANATIONS = "explanations"  # Grad-CAM overlays of a sample of the test split (components/model/explain.py)


# ---------------------------------------------------------------------------------------------
# The records (the metrics themselves: components/model/metrics.py; the gate: components/model/gate.py)
# ---------------------------------------------------------------------------------------------


def metrics_view(record: dict[str, Any]) -> dict[str, float | int]:
    """reports/metrics.json: the numbers of an evaluation record that runs are compared by.

    Test AUROC with its bootstrap interval, sensitivity, specificity, balanced accuracy, accuracy,
    precision, F1, the threshold applied, ECE and Brier score of the shipped (calibrated)
    probabilities and of the uncalibrated ones, the test-set size, and with `evaluate.linear_probe` the
    probe's AUROC and the gain over it with its interval. Strings and structures (class names, positive
    class, confusion matrix, calibration fit) stay in the record (reports/evaluation.json); a value
    that is undefined for this model (an interval without valid resamples, the threshold of a
    multi-class model) is left out rather than written as null. A regression's record ("task":
    "regression") gives its own numbers (components/model/regression_eval.regression_view).
    """
    if record.get("task") == "regression":
        from components.model.regression_eval import regression_view

        return regression_view(record)
    lo, hi = record.get("auroc_ci") or (None, None)
    test = (record.get("calibration") or {}).get("test") or {}
    probe = record.get("linear_probe") or {}
    gain_lo, gain_hi = probe.get("auroc_gain_ci") or (None, None)
    view = {
        "auroc": record.get("auroc"),
        "auroc_ci_low": lo,
        "auroc_ci_high": hi,
        **{
            k: record.get(k)
            for k in ("sensitivity", "specificity", "balanced_accuracy", "accuracy", "precision", "f1", "threshold")
        },
        "ece": test.get("ece_after"),
        "brier": test.get("brier_after"),
        "ece_uncalibrated": test.get("ece_before"),
        "brier_uncalibrated": test.get("brier_before"),
        "n_test": record.get("n_test"),
        "probe_auroc": probe.get("auroc"),
        "auroc_gain": probe.get("auroc_gain"),
        "auroc_gain_ci_low": gain_lo,
        "auroc_gain_ci_high": gain_hi,
    }
    return {
        k: v for k, v in view.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def read_record(reports_dir: str | Path) -> dict[str, Any]:
    """The evaluation record evaluate wrote (reports/evaluation.json): everything metrics.json holds
    and the rest (auroc_ci as [lo, hi], classes, positive_class, threshold_method, tta, calibration
    {method, scale, bias, val, test}, confusion_matrix, bootstrap counts). Export ships it as the
    ONNX `metrics` metadata and the lineage's evaluation.metrics."""
    return read_json(Path(reports_dir) / RECORD)


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def roc_points(y_true: np.ndarray, probs: np.ndarray, positive_index: int) -> pd.DataFrame:
    """Binary: ROC of the positive class; multi-class: micro-average over one-vs-rest scores."""
    k = probs.shape[1]
    if k == 2:
        fpr, tpr, _ = roc_curve((y_true == positive_index).astype(int), probs[:, positive_index])
    else:
        onehot = np.eye(k, dtype=int)[y_true]
        fpr, tpr, _ = roc_curve(onehot.ravel(), probs.ravel())
    return pd.DataFrame({"fpr": np.round(fpr, 6), "tpr": np.round(tpr, 6)})


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, lineterminator="\n")


def plot_roc(roc: pd.DataFrame, metrics: dict[str, Any], path: Path) -> None:
    lo, hi = metrics["auroc_ci"]
    ci = f" (95% CI {lo:.3f}-{hi:.3f})" if lo is not None else ""
    what = f"positive class {metrics['positive_class']}" if metrics["positive_class"] else "micro-average"
    fig, ax = figure(4.5, 4.5)
    ax.plot(roc["fpr"], roc["tpr"], lw=2, label=f"AUROC {metrics['auroc']:.3f}{ci}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        xlim=(0, 1),
        ylim=(0, 1.01),
        title=f"ROC, test set (n={metrics['n_test']}), {what}",
    )
    ax.title.set_fontsize(9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def plot_confusion(metrics: dict[str, Any], path: Path) -> None:
    cm = np.asarray(metrics["confusion_matrix"])
    classes = metrics["classes"]
    fig, ax = figure(1.2 * len(classes) + 2.5, 1.2 * len(classes) + 2)
    ax.imshow(cm, cmap="Blues")
    for (i, j), n in np.ndenumerate(cm):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if n > cm.max() / 2 else "black")
    ax.set(
        xticks=range(len(classes)),
        yticks=range(len(classes)),
        xticklabels=classes,
        yticklabels=classes,
        xlabel="predicted",
        ylabel="actual",
        title=f"Confusion matrix, test set (n={metrics['n_test']})",
    )
    ax.title.set_fontsize(9)
    fig.tight_layout()
    save_png(fig, path)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def predict_logits(deployed: Any, images: np.ndarray, device: Any, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """`deployed.logits` (test-time augmentation included) of uint8 (N, C, H, W) images, in batches.

    Float32 even on CUDA (no autocast): the metrics must describe exactly the model that export
    ships, and the ONNX graph is float32.
    """
    import torch

    deployed.eval().to(device)
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.array(images[start : start + batch_size]))  # copy: memmaps are read-only
            x = batch.to(device=device, dtype=torch.float32) / 255.0
            out.append(deployed.logits(x).float().cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def operating_point(deployed: Any, prepared_dir: Path, device: Any, params: Params) -> dict[str, Any]:
    """Calibration and threshold fitted on the validation split: {scale, bias, threshold, val: {...}}."""
    from components.data.preprocess import load_split

    ev, pos = params.evaluate, params.positive_index
    images, index = load_split(prepared_dir, "val")
    y = index["label_index"].to_numpy().astype(np.int64)
    logits = predict_logits(deployed, images, device)
    scale, bias = calibrate.fit_calibration(ev.calibration, logits, y, pos)
    raw, probs = (
        calibrate.calibrated_probabilities(logits, 1.0, 0.0),
        calibrate.calibrated_probabilities(logits, scale, bias),
    )
    threshold = (
        calibrate.choose_threshold(ev.threshold_method, y, probs[:, pos], pos, ev.threshold)
        if probs.shape[1] == 2
        else ev.threshold
    )
    val = {"n": int(len(y)), **calibrate.calibration_report(y, raw, probs, pos)}
    val_auroc = auroc(y, probs, pos)
    if math.isfinite(val_auroc):  # nan when the validation split lacks a class: left out
        val["auroc"] = val_auroc
    return {"scale": scale, "bias": bias, "threshold": threshold, "val": val}


def evaluate(model_path: str | Path, prepared_dir: str | Path, reports_dir: str | Path, params: Params) -> dict:
    """Score `model_path` on the prepared test split; write the reports; return {metrics (the whole
    record, as reports/evaluation.json), gate}.

    Calibration and the threshold are fitted on the validation split first (`operating_point`),
    then applied unchanged to the test split, as `models.Deployed` applies them in the ONNX graph.
    """
    from components.data.preprocess import load_split
    from components.model import explain
    from components.model.models import Deployed, is_regression, load_checkpoint, pick_device

    model_path, prepared_dir, reports_dir = Path(model_path), Path(prepared_dir), Path(reports_dir)
    if not model_path.is_file():
        raise StageError(f"{model_path} not found; run the train stage first (dvc repro train).")
    classes, ev = list(params.data.classes), params.evaluate
    model, ckpt = load_checkpoint(model_path)
    if is_regression(ckpt) != params.data.regression:
        raise StageError(
            f"{model_path} is a {ckpt.get('task', 'classification')} model, but params data.task is "
            f"{params.data.task}; retrain (dvc repro) or fix params.yaml."
        )
    if not params.data.regression and list(ckpt.get("classes", [])) != classes:
        raise StageError(
            f"{model_path} was trained for classes {ckpt.get('classes')}, but params data.classes "
            f"is {classes}; retrain (dvc repro) or fix params.yaml."
        )
    images, index = load_split(prepared_dir, "test")  # StageError if the split is empty
    if images.shape[1] != ckpt["in_channels"]:
        raise StageError(
            f"{prepared_dir}/test.npy has {images.shape[1]} channel(s) but {model_path} expects "
            f"{ckpt['in_channels']}; rerun preprocess and train (dvc repro)."
        )

    device = pick_device()
    if params.data.regression:
        return evaluate_regression(model, ckpt, model_path, images, index, prepared_dir, reports_dir, params, device)
    deployed = Deployed(model, ev.tta)
    op = operating_point(deployed, prepared_dir, device, params)
    logits = predict_logits(deployed, images, device)
    probs = calibrate.calibrated_probabilities(logits, op["scale"], op["bias"])
    y_true = index["label_index"].to_numpy().astype(np.int64)
    pos, threshold = params.positive_index, op["threshold"]
    try:
        metrics = compute_metrics(y_true, probs, classes, pos, threshold, ev.bootstrap, ev.seed)
    except ValueError as exc:
        raise StageError(f"{prepared_dir}/index.csv (test split): {exc}") from None
    metrics.update(
        threshold_method=ev.threshold_method if len(classes) == 2 else None,
        tta=ev.tta,
        calibration={
            "method": ev.calibration,
            "fitted_on": "val",
            "scale": op["scale"],
            "bias": op["bias"],
            "val": op["val"],
            "test": calibrate.calibration_report(
                y_true, calibrate.calibrated_probabilities(logits, 1.0, 0.0), probs, pos
            ),
        },
    )
    if ev.linear_probe:  # the gain from fine-tuning over the frozen starting backbone + a fitted head
        from components.model.probe import linear_probe

        metrics["linear_probe"] = linear_probe(ckpt, prepared_dir, params, y_true, probs, device)
    gate = apply_gate(metrics, params)
    # Export checks this, so a gate computed for another checkpoint can never release this one.
    gate["checkpoint_sha256"] = sha256_file(model_path)

    y_pred = predict_labels(probs, pos, threshold)
    write_reports(reports_dir, metrics, gate, index, probs, y_pred, pos)
    explain.write_test_samples(reports_dir / EXPLANATIONS, model, images, index, probs, y_pred, params, device)
    log_result(metrics, gate, reports_dir)
    return {"metrics": metrics, "gate": gate}


def evaluate_regression(
    model: Any,
    ckpt: dict[str, Any],
    model_path: Path,
    images: np.ndarray,
    index: pd.DataFrame,
    prepared_dir: Path,
    reports_dir: Path,
    params: Params,
    device: Any,
) -> dict:
    """`evaluate` of a regression model on the test split (`images`, `index`): predictions in the
    target's unit, metrics with intervals, the gate, the reports (components/model/regression_eval.py)."""
    from components.model import explain
    from components.model.models import Deployed
    from components.model.regression_eval import log_regression, regression_record, write_regression_reports
    from components.model.targets import targets

    y_true = targets(prepared_dir, index, "test")
    # One output on the standardised scale; the checkpoint's train-split statistics undo it.
    out = predict_logits(Deployed(model, params.evaluate.tta), images, device)[:, 0]
    y_pred = out * float(ckpt["target_std"]) + float(ckpt["target_mean"])
    try:
        record = regression_record(y_true, y_pred, ckpt, params)
    except ValueError as exc:
        raise StageError(f"{prepared_dir}/index.csv (test split): {exc}") from None
    if params.evaluate.linear_probe:  # the gain from fine-tuning: a ridge head on the frozen starting backbone
        from components.model.probe_regression import regression_probe

        record["linear_probe"] = regression_probe(ckpt, prepared_dir, params, y_true, y_pred, device)
    gate = apply_gate(record, params)
    gate["checkpoint_sha256"] = sha256_file(model_path)  # as for a classifier: export checks it
    write_regression_reports(reports_dir, record, gate, index, y_pred)
    explain.write_regression_samples(reports_dir / EXPLANATIONS, model, images, index, y_true, y_pred, params, device)
    log_regression(record)
    log_gate(gate, reports_dir)
    return {"metrics": record, "gate": gate}


def write_reports(
    reports_dir: Path,
    metrics: dict[str, Any],
    gate: dict[str, Any],
    index: pd.DataFrame,
    probs: np.ndarray,
    y_pred: np.ndarray,
    positive_index: int,
) -> None:
    """The stage's outputs in `reports_dir`: the record, metrics.json, the gate, the CSVs and the plots
    (`index` the test split's rows, `probs` and `y_pred` the shipped model's output for them)."""
    classes = metrics["classes"]
    y_true = index["label_index"].to_numpy().astype(np.int64)
    names = np.asarray(classes, dtype=object)
    preds = pd.DataFrame(
        {"path": index["path"].to_numpy(), "sha256": index["sha256"].to_numpy(), "label": index["label"].to_numpy()}
    )
    for i, c in enumerate(classes):
        preds[f"prob_{c}"] = np.round(probs[:, i], 6)
    preds["predicted"] = names[y_pred]
    roc = roc_points(y_true, probs, positive_index)

    reports_dir.mkdir(parents=True, exist_ok=True)
    write_json(reports_dir / RECORD, metrics)
    write_json(reports_dir / METRICS, metrics_view(metrics))
    write_json(reports_dir / "gate.json", gate)
    _write_csv(reports_dir / "roc.csv", roc)
    _write_csv(reports_dir / "confusion.csv", pd.DataFrame({"actual": names[y_true], "predicted": names[y_pred]}))
    _write_csv(reports_dir / "test_predictions.csv", preds)
    # A regression's predicted-vs-true plot (dvc.yaml declares it for both tasks): its header only.
    _write_csv(reports_dir / "scatter.csv", pd.DataFrame(columns=["true", "predicted"]))
    plot_roc(roc, metrics, reports_dir / "roc.png")
    plot_confusion(metrics, reports_dir / "confusion.png")


def log_result(metrics: dict[str, Any], gate: dict[str, Any], reports_dir: Path) -> None:
    """One line of test metrics, then the gate's verdict (a failure under a banner)."""
    lo, hi = metrics["auroc_ci"]
    ci = f"{lo:.3f}-{hi:.3f}" if lo is not None else "n/a"
    cal, threshold = metrics["calibration"], metrics["threshold"]
    decision = f"threshold {threshold:.3f} ({metrics['threshold_method']})" if threshold is not None else "argmax"
    log.info(
        "test n=%d auroc=%.3f (95%% CI %s, %d valid resamples) accuracy=%.3f balanced accuracy=%.3f "
        "sensitivity=%.3f specificity=%.3f at %s; ECE %.3f -> %.3f, Brier %.3f -> %.3f (%s)",
        metrics["n_test"],
        metrics["auroc"],
        ci,
        metrics["bootstrap_valid"],
        metrics["accuracy"],
        metrics["balanced_accuracy"],
        metrics["sensitivity"],
        metrics["specificity"],
        decision,
        cal["test"]["ece_before"],
        cal["test"]["ece_after"],
        cal["test"]["brier_before"],
        cal["test"]["brier_after"],
        cal["method"],
    )
    log_gate(gate, reports_dir)


def main(argv: Sequence[str] | None = None) -> int:
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="models/model.pt", help="checkpoint from train (default: models/model.pt)")
        p.add_argument("--prepared", default="data/prepared", help="preprocess output folder (default: data/prepared)")
        p.add_argument("--reports", default="reports", help="where the reports go (default: reports)")

    def run(args: argparse.Namespace) -> None:
        evaluate(args.model, args.prepared, args.reports, load_params(args.params))

    return stage_main(
        "Stage 6: test metrics with bootstrap intervals, plots and the release gate.", add_args, run, argv
    )


if __name__ == "__main__":
    raise SystemExit(main())
