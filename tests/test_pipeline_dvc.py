"""The spine end to end: real `dvc repro` in a temporary git repository on tiny synthetic DICOMs.

Checks the ONNX model (symbolic batch, parity, metadata), the no-op rerun, that a parameter
change reruns only downstream stages, the gate refusing export, bad raw files stopping the
pipeline with a named error, and that the raw data is byte-identical afterwards.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from workspace import make_workspace, run, set_params, tree_digest


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("spine") / "ws")
    raw_before = tree_digest(ws / "data/raw")
    first = run(["dvc", "repro"], ws)
    # Commit like a user would, so `dvc params diff` / `dvc metrics diff` have a baseline.
    run(["git", "add", "-A"], ws)
    run(["git", "commit", "-qm", "first model"], ws)
    return ws, raw_before, first


def test_repro_builds_a_gated_onnx_model_with_parity_and_metadata(built):
    import onnx
    import onnxruntime as ort

    ws, _, _ = built
    model = onnx.load(ws / "models/model.onnx")
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.HasField("dim_value"), "batch dimension must be symbolic"

    meta = {p.key: p.value for p in model.metadata_props}
    manifest = json.loads((ws / "data/manifest.json").read_text())
    raw_dvc = yaml.safe_load((ws / "data/raw.dvc").read_text())
    assert meta["data_version"] == raw_dvc["outs"][0]["md5"] == manifest["data_version"]
    assert json.loads(meta["classes"]) == ["normal", "lesion"]
    for key in ("model_id", "preprocessing", "normalisation", "git_commit", "params_sha256", "metrics", "gate"):
        assert meta.get(key), key
    assert json.loads(meta["gate"])["passed"] is True

    exp = json.loads((ws / "reports/export.json").read_text())
    assert exp["max_abs_diff_batch1"] <= 1e-4 and exp["max_abs_diff_batchN"] <= 1e-4

    # The ONNX model reproduces the evaluation's test probabilities from the prepared test images.
    images = np.load(ws / "data/prepared/test.npy").astype(np.float32) / 255.0
    session = ort.InferenceSession(str(ws / "models/model.onnx"), providers=["CPUExecutionProvider"])
    probs = session.run(None, {session.get_inputs()[0].name: images})[0]
    assert probs.shape == (len(images), 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)

    assert (ws / "models/model_card.md").read_text().strip()
    for report in ("validation.json", "validation.md", "metrics.json", "roc.png", "confusion.png",
                   "augment_preview.png", "train_history.csv"):
        assert (ws / "reports" / report).is_file(), report


def test_no_patient_identifier_reaches_any_artefact(built):
    ws, _, _ = built
    needles = [b"DEMO-0", b"Demo^Patient"]
    for folder in ("data/manifest.csv", "data/manifest.json", "data/prepared", "models", "reports", "dvc.lock"):
        path = ws / folder
        for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            blob = f.read_bytes()
            assert not any(n in blob for n in needles), f"patient identifier leaked into {f}"


def test_second_repro_is_a_noop_and_status_is_clean(built):
    ws, _, _ = built
    stamp = (ws / "models/model.pt").stat().st_mtime_ns
    again = run(["dvc", "repro"], ws)
    assert "Data and pipelines are up to date" in again.stdout, again.stdout
    assert (ws / "models/model.pt").stat().st_mtime_ns == stamp
    assert "up to date" in run(["dvc", "status"], ws).stdout


def test_param_change_reruns_only_downstream_stages(built):
    ws, _, _ = built
    set_params(ws, {"evaluate": {"bootstrap": 60}})
    out = run(["dvc", "repro"], ws).stdout
    for stage in ("ingest", "validate", "preprocess", "augment", "train"):
        assert f"Stage '{stage}' didn't change, skipping" in out, out
    assert "Running stage 'evaluate'" in out and "Running stage 'export'" in out
    assert "evaluate.bootstrap" in run(["dvc", "params", "diff"], ws).stdout
    run(["dvc", "metrics", "diff"], ws)  # must work against the committed baseline


def test_returning_to_earlier_train_params_restores_the_model_from_the_run_cache(built):
    # DVC's run cache skips any stage with a `cache: false` output; train has none, so an
    # experiment that goes back to earlier parameters restores the model instead of retraining.
    ws, _, _ = built
    before = (ws / "models/model.pt").read_bytes()
    lr = yaml.safe_load((ws / "params.yaml").read_text())["train"]["lr"]
    set_params(ws, {"train": {"lr": lr / 2}})
    assert "Running stage 'train'" in run(["dvc", "repro"], ws).stdout
    assert (ws / "models/model.pt").read_bytes() != before
    set_params(ws, {"train": {"lr": lr}})
    out = run(["dvc", "repro"], ws).stdout
    assert "Stage 'train' is cached - skipping run, checking out outputs" in out, out
    assert (ws / "models/model.pt").read_bytes() == before
    assert (ws / "reports/train.json").is_file()


def test_raw_data_is_byte_identical_after_runs(built):
    ws, raw_before, _ = built
    assert tree_digest(ws / "data/raw") == raw_before


def test_failed_gate_stops_before_export(built, tmp_path):
    ws, _, _ = built
    set_params(ws, {"evaluate": {"gate": {"min_auroc": 1.0, "min_sensitivity": 1.0, "min_specificity": 1.0}},
                    "train": {"lr": 1e-9, "epochs": 1}})
    (ws / "models/model.onnx").unlink()
    out = run(["dvc", "repro"], ws, check=False)
    assert out.returncode != 0
    assert "gate" in (out.stdout + out.stderr).lower()
    assert not (ws / "models/model.onnx").exists()
    gate = json.loads((ws / "reports/gate.json").read_text())
    assert gate["passed"] is False and gate["reasons"]
    assert (ws / "reports/metrics.json").is_file()


def test_bad_raw_files_stop_the_pipeline_with_a_named_error(tmp_path):
    ws = make_workspace(tmp_path / "ws", patients=8)
    unreadable = ws / "data/raw/lesion/broken_scan.dcm"
    unreadable.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    src = next((ws / "data/raw/normal").glob("*.dcm"))
    mislabelled = ws / "data/raw/lesoin" / src.name
    mislabelled.parent.mkdir()
    mislabelled.write_bytes(src.read_bytes())
    run(["dvc", "add", "-q", "data/raw"], ws)
    out = run(["dvc", "repro"], ws, check=False)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    # One validation run names every problem: the unreadable file, the unknown label, the duplicate.
    assert "broken_scan.dcm" in text and "lesoin" in text, text
    assert "Traceback" not in text, text
    assert (ws / "reports/validation.md").is_file()
    assert not (ws / "data/prepared").exists() and not (ws / "models/model.pt").exists()
