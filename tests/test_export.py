"""Export stage: gate refusal, symbolic batch, parity, metadata, card and lineage, no patient ids."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from components.common import StageError, sha256_file
from components.release.export import main
from tests.builders import RAW_PATIENT, make_checkpoint, make_project, run_export, tiny_params

# Only facts the stage's inputs determine (DVC caches model.onnx); the run's facts are in lineage.json.
METADATA_KEYS = {
    "model_id",
    "classes",
    "input",
    "output",
    "normalisation",
    "preprocessing",
    "data_version",
    "content_hash",
    "params_sha256",
    "metrics",
    "gate",
    "checkpoint_sha256",
    "pretrained",
    "opset",
    "exporter",
}


def export_args(p: dict) -> list[str]:
    """`medtune export`'s path options for a project made by tests.builders.make_project."""
    paths = ("model", "prepared", "reports", "out", "manifest")
    return [arg for key in paths for arg in (f"--{key}", str(p[key]))]


def shipped_and_evaluated(p, params) -> tuple[np.ndarray, np.ndarray]:
    """Export; return the ONNX graph's probabilities on the test images and evaluate's for the same images."""
    import pandas as pd

    run_export(p, params)
    sess = ort.InferenceSession(str(p["out"] / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.load(p["prepared"] / "test.npy").astype(np.float32) / 255
    evaluated = pd.read_csv(p["reports"] / "test_predictions.csv")[["prob_normal", "prob_lesion"]].to_numpy()
    return sess.run(["probabilities"], {"image": x})[0], evaluated


def test_export_writes_a_parity_checked_model_with_metadata(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = tiny_params()
    p = make_project(tmp_path, params)
    report = run_export(p, params)

    onnx_path = p["out"] / "model.onnx"
    proto = onnx.load(str(onnx_path))
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value
    assert [i.name for i in proto.graph.input] == ["image"] and [o.name for o in proto.graph.output] == [
        "probabilities"
    ]
    meta = {m.key: m.value for m in proto.metadata_props}
    assert set(meta) == METADATA_KEYS
    mid = sha256_file(p["model"])[:12]
    assert meta["model_id"] == mid == report["model_id"]
    assert json.loads(meta["classes"]) == ["normal", "lesion"]
    assert json.loads(meta["input"])["shape"] == ["batch", 1, 32, 32]
    assert json.loads(meta["preprocessing"])["image_size"] == 32
    assert json.loads(meta["gate"])["passed"] is True
    assert meta["params_sha256"] == params.digest() and meta["opset"] == str(params.export.opset)
    assert proto.producer_name == "pytorch" and proto.producer_version  # the exporting torch, in the graph itself
    # The whole evaluation record ships (predict reads its positive class and threshold), not only
    # the numbers of metrics.json.
    record = json.loads((p["reports"] / "evaluation.json").read_text())
    assert json.loads(meta["metrics"]) == record and record["positive_class"] == "lesion" and "threshold" in record

    # Parity within 1e-4 at batch 1 and batch N, as measured by the stage and as re-checked here.
    assert report["max_abs_diff_batch1"] <= 1e-4 and report["max_abs_diff_batchN"] <= 1e-4
    assert report["batch_n"] == min(params.export.parity_batch, 8)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = np.load(p["prepared"] / "test.npy").astype(np.float32) / 255
    for batch in (x[:1], x[:5]):
        probs = sess.run(["probabilities"], {"image": batch})[0]
        assert probs.shape == (len(batch), 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert report["onnx_sha256"] == sha256_file(onnx_path)
    assert json.loads((p["reports"] / "export.json").read_text()) == report

    lineage = json.loads((p["out"] / "lineage.json").read_text())
    assert lineage["model_id"] == mid and lineage["onnx_sha256"] == report["onnx_sha256"]
    assert lineage["validation"] == {
        "suite": "manifest",
        "success": True,
        "failed": ["size_range", "near_duplicates_in_one_split"],
    }
    assert lineage["data"]["manifest_sha256"] == sha256_file(p["manifest"].with_suffix(".csv"))
    assert "torch" in lineage["environment"]["packages"] and "dvc_lock_sha256" not in lineage["code"]
    assert set(lineage["code"]) == {"git_commit", "git_dirty", "params", "params_sha256"}
    # Where the weights were made, from the checkpoint (CPU training reproduces only on that processor).
    assert lineage["environment"]["training_device"] == "cpu"
    assert lineage["environment"]["training_processor"] == "Test Processor 9000"
    assert lineage["code"]["params"] == params.to_dict()
    assert lineage["export"]["max_abs_diff_batchN"] == report["max_abs_diff_batchN"]
    assert lineage["evaluation"]["metrics"] == record  # trace and audit read the record from here
    card = (p["out"] / "model_card.md").read_text()
    for needle in ("not a diagnostic device", "AUROC", "95% interval", "Limitations", "medtune predict", mid):
        assert needle in card
    # A tolerated leak across splits is said where a reader of the test metrics will see it.
    assert "3 group(s) of near-duplicate images sit in more than one split" in card
    assert "byte-identical" not in card

    # No raw patient ids, nor their hashes, anywhere in what export writes.
    for path in (onnx_path, p["out"] / "model_card.md", p["out"] / "lineage.json", p["reports"] / "export.json"):
        assert RAW_PATIENT.encode() not in path.read_bytes()
        assert b"0123456789abcdef" not in path.read_bytes()

    # Same inputs, same bytes (no timestamps).
    before = {f.name: f.read_bytes() for f in p["out"].iterdir()}
    run_export(p, params)
    assert {f.name: f.read_bytes() for f in p["out"].iterdir()} == before


@pytest.mark.slow
def test_the_cached_onnx_is_byte_identical_at_another_commit_in_another_process(tmp_path, monkeypatch):
    """DVC caches models/model.onnx, so the same checkpoint and inputs exported again (after a commit,
    by the `medtune export` command in a new process) give the same bytes. The uncached outputs hold
    what the run measured: lineage.json names the commit each export ran at, and the card the
    ONNX-PyTorch parity of this run (its last digits depend on the threads' scheduling)."""
    import subprocess

    import yaml

    from components.params import load_params
    from tests.workspace import BIN, run, tool_env

    monkeypatch.chdir(tmp_path)
    params = tiny_params()
    p = make_project(tmp_path, params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.to_dict()))
    assert load_params(tmp_path / "params.yaml").digest() == params.digest()  # both runs use the same parameters
    env = tool_env()
    run(["git", "init", "-q"], tmp_path, env)
    run(["git", "add", "params.yaml"], tmp_path, env)
    run(["git", "commit", "-q", "-m", "first"], tmp_path, env)

    run_export(p, params)
    outputs = ("model.onnx",)
    first = {name: sha256_file(p["out"] / name) for name in outputs}
    first_lineage = json.loads((p["out"] / "lineage.json").read_text())

    (tmp_path / "README.md").write_text("a later commit\n")
    run(["git", "add", "README.md"], tmp_path, env)
    run(["git", "commit", "-q", "-m", "second"], tmp_path, env)
    out = subprocess.run(
        [str(BIN / "medtune"), "export", *export_args(p)],
        cwd=tmp_path,
        env={**env, "PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lineage = json.loads((p["out"] / "lineage.json").read_text())

    head = run(["git", "rev-parse", "HEAD"], tmp_path, env).stdout.strip()
    assert lineage["code"]["git_commit"] == head != first_lineage["code"]["git_commit"]  # the runs did differ
    assert {name: sha256_file(p["out"] / name) for name in outputs} == first
    assert lineage["onnx_sha256"] == first_lineage["onnx_sha256"] == first["model.onnx"]


def test_the_card_template_lays_out_every_branch():
    """The card's other branches (three classes, no bootstrap interval, sparse records, a synthetic data
    set, both leak kinds, a failed gate, an ensemble warm-started from a champion): each line exact."""
    from components.release.model_card import model_card

    metrics = {
        "classes": ["a", "b", "c"],
        "n_test": 9,
        "averaging": "macro",
        "auroc": 0.7,
        "auroc_ci": [None, None],
        "confusion_matrix": [[1, 1, 1], [0, 3, 0], [0, 0, 3]],
        "sensitivity": 0.7,
        "specificity": 0.8,
        "precision": 0.71,
        "accuracy": 0.777,
        "f1": 0.7,
        "threshold_method": "accuracy",
    }
    ckpt = {
        "backbone": "resnet18",
        "members": 3,
        "pretrained": {"description": "champion 3f2a9c1e0b7d"},
        "params": {"train": {"freeze": "last_n", "unfreeze_last_n": 2, "seed": 5}},
    }
    leaks = {
        "expectations": [
            {"name": "duplicates_in_one_split", "success": False, "details": {}},
            {"name": "near_duplicates_in_one_split", "success": False, "details": {"n_offending": 2}},
        ]
    }
    exp = {"opset": 17, "max_abs_diff_batch1": 3.2e-7, "max_abs_diff_batchN": 0.0, "batch_n": 8}
    card = model_card("abc123def456", ckpt, {}, metrics, {"passed": False}, {}, exp, True, leaks)
    lines = card.splitlines()
    for line in [
        "Research and decision support only: ranks scans as `a` / `b` / `c` to help a qualified reader prioritise. "
        "It is **not a diagnostic device**, is not cleared or approved by any regulator, and must not be used to "
        "make or rule out a diagnosis on its own.",
        "- images: None (0 unreadable, excluded); patient-level split (unknown), no patient in two splits",
        "| split | a | b | c | total |",
        "|---|---|---|---|---|",
        "| test | 0 | 0 | 0 | 0 |",
        "- backbone: `resnet18`; started from: champion 3f2a9c1e0b7d",
        "- fine-tuning: freeze = `last_n` (last 2 blocks), optimizer None, lr None, None epochs run, best epoch None "
        "by None; an ensemble of 3 models (seeds 5 to 7, one per list entry), logits averaged",
        "- input: None channel(s), None x None px, DICOM window `None`, resize as recorded",
        "- ONNX: opset 17, parity with PyTorch max |diff| 3.20e-07 (batch 1), 0.00e+00 (batch 8)",
        "| AUROC | 0.700 | n/a |",
        "| accuracy | 0.777 | 0.453 - 0.937 (Wilson, 7/9) |",
        "| F1 | 0.700 | |",
        "| specificity (macro) | 0.800 | |",
        "Decision rule: the class with the highest probability (threshold chosen on the validation split (best "
        "accuracy)). Confusion matrix (rows = actual, columns = predicted, order ['a', 'b', 'c']): "
        "`[[1, 1, 1], [0, 3, 0], [0, 0, 3]]`.",
        "Test-time augmentation: none. Calibration: none. Both are inside the ONNX graph.",
        "Decision: **failed**.",
        "- **Some group(s) of byte-identical images sit in more than one split** (tolerated by "
        "`validate.max_duplicates`; listed in reports/validation.md): the model was tested partly on pictures it "
        "trained on, so the test metrics are optimistic.",
        "- **The data is the synthetic demo set** (`medtune demo-data`): these numbers say nothing about "
        "performance on real scans.",
    ]:
        assert line in lines, line
    assert "- **2 group(s) of near-duplicate images" in card and "sensitivity |" not in card
    assert card.startswith("# Model card: medtune classifier `abc123def456`\n\n## Intended use\n")
    assert card.endswith("Lineage: `models/lineage.json`.\n") and "\n\n\n" not in card


def test_failed_gate_refuses_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    params = tiny_params(min_auroc=1.01)
    p = make_project(tmp_path, params)
    with pytest.raises(StageError, match=r"model failed the gate: auroc .* < min_auroc 1.01; not exported"):
        run_export(p, params)
    assert sorted(f.name for f in p["out"].iterdir()) == ["model.pt"]
    assert not (p["reports"] / "export.json").exists()

    (tmp_path / "params.yaml").write_text("evaluate:\n  gate:\n    min_auroc: 1.01\n")
    rc = main(["--params", "params.yaml", *export_args(p)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "model failed the gate" in err and "metrics.json" in err and "Traceback" not in err
    assert sorted(f.name for f in p["out"].iterdir()) == ["model.pt"]


def test_gate_for_another_checkpoint_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = tiny_params()
    p = make_project(tmp_path, params)
    make_checkpoint(p["model"], seed=1)  # retrained, but evaluate was not rerun
    with pytest.raises(StageError, match="rerun evaluate"):
        run_export(p, params)
    assert not (p["out"] / "model.onnx").exists()


@pytest.mark.slow
def test_tta_calibration_and_threshold_are_what_the_onnx_graph_ships(tmp_path, monkeypatch):
    from components.params import parse_params

    monkeypatch.chdir(tmp_path)
    params = parse_params(
        {
            "evaluate": {
                "positive_class": "lesion",
                "bootstrap": 20,
                "tta": "hflip",
                "calibration": "temperature",
                "threshold_method": "youden",
                "gate": {
                    "min_auroc": 0.0,
                    "min_sensitivity": 0.0,
                    "min_specificity": 0.0,
                    "min_balanced_accuracy": 0.0,
                },
            }
        }
    )
    p = make_project(tmp_path, params)
    metrics = json.loads((p["reports"] / "evaluation.json").read_text())
    cal = metrics["calibration"]
    assert metrics["tta"] == "hflip" and metrics["threshold_method"] == "youden" and cal["method"] == "temperature"
    assert cal["fitted_on"] == "val" and cal["scale"] != 1.0 and cal["val"]["n"] == 4
    assert set(cal["test"]) == {"ece_before", "ece_after", "brier_before", "brier_after"}
    assert 0 < metrics["threshold"] < 1

    shipped, evaluated = shipped_and_evaluated(p, params)
    assert np.abs(shipped - evaluated).max() < 1e-5
    # Without the calibration and the mirrored image the graph would compute something else.
    raw, _ = shipped_and_evaluated(make_project(tmp_path / "plain", tiny_params()), tiny_params())  # same weights
    assert np.abs(raw - shipped).max() > 1e-3
    card = (p["out"] / "model_card.md").read_text()
    assert "chosen on the validation split (Youden's J)" in card and "Test-time augmentation: hflip" in card


@pytest.mark.slow
def test_an_ensemble_ships_as_one_onnx_graph_that_reproduces_the_evaluation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = tiny_params()
    p = make_project(tmp_path, params, members=3)
    shipped, evaluated = shipped_and_evaluated(p, params)
    assert np.abs(shipped - evaluated).max() < 1e-5
    # ... and it is not just its first member (the seed-0 model alone).
    one, _ = shipped_and_evaluated(make_project(tmp_path / "one", params), params)
    assert np.abs(one - shipped).max() > 1e-3
    assert "an ensemble of 3 models" in (p["out"] / "model_card.md").read_text()
