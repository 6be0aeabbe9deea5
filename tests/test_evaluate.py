"""Evaluate stage: metrics against hand-computed values, the gate, and the stage on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from components.model.evaluate import apply_gate, metrics_view
from components.model.metrics import compute_metrics
from components.params import parse_params
from tests.builders import RAW_PATIENT, make_checkpoint, make_prepared, tiny_params

BINARY = ["normal", "lesion"]


def binary_probs(p_pos):
    p_pos = np.asarray(p_pos, dtype=float)
    return np.stack([1 - p_pos, p_pos], axis=1)


def test_metrics_view_holds_the_defined_numbers_only():
    y = np.array([0, 0, 0, 0, 1, 1])
    binary = compute_metrics(y, binary_probs([0.1, 0.7, 0.2, 0.3, 0.8, 0.4]), BINARY, 1, 0.5, n_boot=0, seed=0)
    view = metrics_view(binary)
    # No valid resample: the interval is undefined, so it is left out rather than written as null.
    assert "auroc_ci_low" not in view and view["threshold"] == 0.5 and view["f1"] == binary["f1"]

    rng = np.random.default_rng(1)
    y3 = np.array([0, 1, 2] * 6)
    probs = rng.dirichlet([1, 1, 1], size=len(y3))
    multi = compute_metrics(y3, probs, ["a", "b", "c"], 2, 0.5, n_boot=50, seed=3)
    view = metrics_view(multi)
    # A multi-class model applies no threshold, so metrics.json has none.
    assert "threshold" not in view and view["auroc_ci_low"] == multi["auroc_ci"][0]
    assert view["sensitivity"] == multi["sensitivity"]
    assert all(type(v) in (int, float) for v in view.values())


def test_gate_reasons_for_pass_and_fail():
    params = parse_params(
        {
            "evaluate": {
                "gate": {
                    "min_auroc": 0.75,
                    "min_sensitivity": 0.6,
                    "min_specificity": 0.5,
                    "min_balanced_accuracy": 0.6,
                }
            }
        }
    )
    ok = apply_gate({"auroc": 0.9, "sensitivity": 0.8, "specificity": 0.7, "balanced_accuracy": 0.75}, params)
    assert ok["passed"] and ok["failed"] == [] and len(ok["reasons"]) == 4
    assert ok["thresholds"] == {
        "min_auroc": 0.75,
        "min_sensitivity": 0.6,
        "min_specificity": 0.5,
        "min_balanced_accuracy": 0.6,
    }

    bad = apply_gate({"auroc": 0.62, "sensitivity": 0.8, "specificity": 0.4, "balanced_accuracy": 0.6}, params)
    assert not bad["passed"]
    assert "auroc 0.62 < min_auroc 0.75" in bad["reasons"]
    assert bad["failed"] == ["auroc 0.62 < min_auroc 0.75", "specificity 0.4 < min_specificity 0.5"]
    assert bad["metrics"] == {"auroc": 0.62, "sensitivity": 0.8, "specificity": 0.4, "balanced_accuracy": 0.6}
    json.dumps(bad)

    # metrics.json from before balanced accuracy was computed: the check fails, it is not skipped.
    old = apply_gate({"auroc": 0.9, "sensitivity": 0.8, "specificity": 0.7}, params)
    assert old["failed"] == ["balanced_accuracy is undefined; needs >= min_balanced_accuracy 0.6"]


def _scored(labels, p_pos):
    """Binary metrics at the 0.5 threshold for hand-made labels and positive-class probabilities."""
    return compute_metrics(np.asarray(labels), binary_probs(p_pos), BINARY, 1, 0.5, n_boot=0, seed=0)


def test_default_gate_refuses_a_model_that_calls_nearly_everything_positive():
    # The model that was once exported and promoted: 40 lesions all found, but 70 of 71 normals
    # called lesion too (specificity 1/71 = 0.014, accuracy 41/111 = 0.37). It ranks perfectly
    # (AUROC 1.0), so an AUROC floor alone cannot see that its threshold is useless.
    labels = [0] * 71 + [1] * 40
    p_pos = [0.3] + list(np.linspace(0.55, 0.9, 70)) + list(np.linspace(0.92, 0.99, 40))
    m = _scored(labels, p_pos)
    assert m["sensitivity"] == 1.0 and m["specificity"] == pytest.approx(1 / 71)
    assert m["accuracy"] == pytest.approx(41 / 111) and m["auroc"] == 1.0
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 / 71) / 2)

    gate = apply_gate(m, parse_params({}))  # the defaults, as params.yaml ships them
    assert not gate["passed"]
    assert gate["failed"] == [
        "specificity 0.0141 < min_specificity 0.5",
        "balanced_accuracy 0.507 < min_balanced_accuracy 0.65",
    ]

    # Calling every image lesion (or every image normal) fails as well, whichever floor catches it.
    assert not apply_gate(_scored(labels, [0.9] * 111), parse_params({}))["passed"]
    assert not apply_gate(_scored(labels, [0.1] * 111), parse_params({}))["passed"]


def test_default_gate_refuses_an_always_one_class_multiclass_model():
    # Three classes, every image called "a": macro specificity 2/3 clears its floor, but balanced
    # accuracy is chance (1/3) and says what the model is.
    y = np.array([0, 1, 2] * 10)
    probs = np.tile([0.5, 0.3, 0.2], (len(y), 1))
    probs[np.arange(len(y)), y] += np.linspace(0, 0.1, len(y))  # some ranking, never enough to win
    probs /= probs.sum(axis=1, keepdims=True)
    m = compute_metrics(y, probs, ["a", "b", "c"], 2, 0.5, n_boot=0, seed=0)
    assert m["specificity"] == pytest.approx(2 / 3) and m["balanced_accuracy"] == pytest.approx(1 / 3)
    gate = apply_gate(m, parse_params({"data": {"classes": ["a", "b", "c"]}}))
    assert "balanced_accuracy 0.3333 < min_balanced_accuracy 0.65" in gate["failed"]


def test_default_gate_passes_a_decent_model():
    # 40 normals, 40 lesions: 34 lesions found (sensitivity 0.85), 32 normals kept (specificity 0.8).
    labels = [0] * 40 + [1] * 40
    p_pos = (
        list(np.linspace(0.05, 0.45, 32))
        + list(np.linspace(0.55, 0.7, 8))
        + list(np.linspace(0.3, 0.45, 6))
        + list(np.linspace(0.6, 0.99, 34))
    )
    m = _scored(labels, p_pos)
    assert m["sensitivity"] == pytest.approx(0.85) and m["specificity"] == pytest.approx(0.8)
    gate = apply_gate(m, parse_params({}))
    assert gate["passed"], gate["failed"]
    assert gate["thresholds"] == {
        "min_auroc": 0.75,
        "min_sensitivity": 0.6,
        "min_specificity": 0.5,
        "min_balanced_accuracy": 0.65,
    }


# ---------------------------------------------------------------------------------------------
# The stage on a tiny prepared folder and a random-weight checkpoint (tests/builders.py)
# ---------------------------------------------------------------------------------------------


def test_evaluate_stage_writes_reports(tmp_path):
    import pandas as pd
    import torch

    from components.model.evaluate import evaluate
    from components.model.models import load_checkpoint

    prepared = make_prepared(tmp_path / "prepared")
    ckpt = make_checkpoint(tmp_path / "model.pt")
    reports = tmp_path / "reports"
    out = evaluate(ckpt, prepared, reports, tiny_params())

    record = json.loads((reports / "evaluation.json").read_text())
    gate = json.loads((reports / "gate.json").read_text())
    assert gate["passed"] is True and out["gate"]["passed"] is True and out["metrics"] == record
    assert record["n_test"] == 8 and record["classes"] == BINARY and record["positive_class"] == "lesion"
    assert np.array(record["confusion_matrix"]).sum() == 8
    # metrics.json (what dvc metrics / dvc exp show list): the record's numbers, nothing else.
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics == metrics_view(record) and all(type(v) in (int, float) for v in metrics.values())
    assert set(metrics) == {
        "auroc",
        "auroc_ci_low",
        "auroc_ci_high",
        "accuracy",
        "balanced_accuracy",
        "sensitivity",
        "specificity",
        "precision",
        "f1",
        "threshold",
        "ece",
        "brier",
        "ece_uncalibrated",
        "brier_uncalibrated",
        "n_test",
        "probe_auroc",
        "auroc_gain",
        "auroc_gain_ci_low",
        "auroc_gain_ci_high",
    }
    assert [metrics["auroc_ci_low"], metrics["auroc_ci_high"]] == record["auroc_ci"]
    assert metrics["ece"] == record["calibration"]["test"]["ece_after"]

    preds = pd.read_csv(reports / "test_predictions.csv")
    assert list(preds.columns) == ["path", "sha256", "label", "prob_normal", "prob_lesion", "predicted"]
    # The probabilities are the model's softmax on the scaled test images.
    model, _ = load_checkpoint(ckpt)
    x = torch.from_numpy(np.load(prepared / "test.npy").astype(np.float32) / 255)
    with torch.no_grad():
        expected = torch.softmax(model(x), 1).numpy()
    assert np.allclose(preds[["prob_normal", "prob_lesion"]].to_numpy(), expected, atol=1e-5)
    assert metrics["auroc"] == pytest.approx(roc_auc_score(preds["label"] == "lesion", expected[:, 1]), abs=1e-6)

    roc = pd.read_csv(reports / "roc.csv")
    assert list(roc.columns) == ["fpr", "tpr"] and roc["tpr"].iloc[-1] == 1.0
    conf = pd.read_csv(reports / "confusion.csv")
    assert list(conf.columns) == ["actual", "predicted"] and len(conf) == 8
    assert set(conf["actual"]) == set(BINARY)
    for png in ("roc.png", "confusion.png"):
        assert (reports / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = {p.relative_to(reports).as_posix(): p.read_bytes() for p in reports.rglob("*") if p.is_file()}

    # Deterministic (no dates or versions in any artefact) and free of patient identifiers.
    evaluate(ckpt, prepared, reports, tiny_params())
    assert {p.relative_to(reports).as_posix(): p.read_bytes() for p in reports.rglob("*") if p.is_file()} == first
    patients = pd.read_csv(prepared / "index.csv")["patient"]
    for blob in first.values():
        assert b"Matplotlib" not in blob and RAW_PATIENT.encode() not in blob
        assert not any(h.encode() in blob for h in patients)


def test_evaluate_failed_gate_still_writes_metrics(tmp_path, caplog):
    from components.model.evaluate import evaluate

    prepared = make_prepared(tmp_path / "prepared")
    ckpt = make_checkpoint(tmp_path / "model.pt")
    out = evaluate(ckpt, prepared, tmp_path / "reports", tiny_params(min_auroc=1.01))
    gate = json.loads((tmp_path / "reports" / "gate.json").read_text())
    assert gate["passed"] is False and out["gate"]["passed"] is False
    assert any(r.startswith("auroc ") and "< min_auroc 1.01" in r for r in gate["failed"])
    assert (tmp_path / "reports" / "metrics.json").is_file()
    assert "GATE FAILED" in caplog.text


def test_evaluate_main_reports_class_mismatch(tmp_path, capsys):
    from components.model.evaluate import main

    prepared = make_prepared(tmp_path / "prepared")
    ckpt = make_checkpoint(tmp_path / "model.pt", classes=("a", "b"))
    (tmp_path / "params.yaml").write_text("evaluate:\n  bootstrap: 5\n")
    rc = main(
        [
            "--params",
            str(tmp_path / "params.yaml"),
            "--model",
            str(ckpt),
            "--prepared",
            str(prepared),
            "--reports",
            str(tmp_path / "reports"),
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "model.pt" in err and "['a', 'b']" in err and "Traceback" not in err
    assert not (tmp_path / "reports" / "metrics.json").exists()


def test_save_png_writes_the_same_bytes_without_a_version_and_leaves_no_temporary(tmp_path):
    from components.plots import figure, save_png

    def draw(path):
        fig, ax = figure(3, 2)
        ax.plot([0, 1, 2], [0, 1, 0.5])
        ax.set(title="a figure")
        save_png(fig, path)
        return path.read_bytes()

    first = draw(tmp_path / "a.png")
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and draw(tmp_path / "b.png") == first
    assert b"Software" not in first and b"Matplotlib" not in first  # no version text chunk
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]
