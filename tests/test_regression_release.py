"""The release and audit side of regression: export (the graph gives values in target units), predict
(a `value` column), the champion/challenger decision on MAE/RMSE/R^2, the model card and the trace."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.builders import run_export
from tests.regression_release_builders import (
    TARGET_MEAN,
    TARGET_STD,
    make_regression_project,
    regression_params,
    torch_values,
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One regression model exported by the real export stage (random weights, a linear probe recorded)."""
    params = regression_params()
    p = make_regression_project(tmp_path_factory.mktemp("regression-export"))
    report = run_export(p, params)
    return p, params, report


def test_the_onnx_graph_gives_head_times_std_plus_mean_and_records_the_stats(exported):
    import onnx
    import onnxruntime as ort

    from components.release.onnx_runtime import read_metadata

    p, params, report = exported
    onnx_path = p["out"] / "model.onnx"
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["value"]
    images = np.load(p["prepared"] / "test.npy")
    for batch in (images[:1], images):
        got = session.run(["value"], {"image": batch.astype(np.float32) / 255.0})[0]
        assert got.shape == (len(batch), 1) and got.dtype == np.float32
        np.testing.assert_allclose(got, torch_values(p["model"], batch), rtol=0, atol=1e-3)
    # Values in target units: around the targets' mean, not the standardised output around 0.
    assert abs(float(got.mean()) - TARGET_MEAN) < 5 * TARGET_STD and abs(float(got.mean())) > 10

    meta = read_metadata(onnx_path)
    assert meta["task"] == "regression" and meta["output"] == "value" and meta["classes"] == []
    assert meta["target_mean"] == TARGET_MEAN and meta["target_std"] == TARGET_STD
    assert meta["metrics"]["task"] == "regression"
    assert {prop.key for prop in onnx.load(str(onnx_path)).metadata_props} >= {"task", "target_mean", "target_std"}

    # Parity on values, with the tolerance in target units.
    # (plus a few float32 steps at the size of the mean, which the graph adds in float32)
    assert report["value_tolerance"] == pytest.approx(params.export.tolerance * TARGET_STD, rel=0.05)
    assert report["max_abs_diff_batchN"] <= report["value_tolerance"]
    lineage = json.loads((p["out"] / "lineage.json").read_text())
    assert lineage["target"] == {"mean": TARGET_MEAN, "std": TARGET_STD}


def test_tta_hflip_averages_the_values_inside_the_graph(tmp_path):
    import onnxruntime as ort

    params = regression_params(tta="hflip")
    p = make_regression_project(tmp_path, tta="hflip", probe_mae=None)
    run_export(p, params)
    session = ort.InferenceSession(str(p["out"] / "model.onnx"), providers=["CPUExecutionProvider"])
    images = np.load(p["prepared"] / "test.npy")
    got = session.run(["value"], {"image": images.astype(np.float32) / 255.0})[0]
    np.testing.assert_allclose(got, torch_values(p["model"], images, "hflip"), rtol=0, atol=1e-3)
    assert np.abs(got - torch_values(p["model"], images)).max() > 1e-3  # the mirror did change the values


def test_predict_writes_a_value_per_scan_without_importing_torch(exported, tmp_path):
    """`medtune predict` on a folder: path,value,error, each value the graph's on the scan (a 32 px grey PNG
    is exactly its prepared array), an unreadable file an empty value; the process imports no torch."""
    import subprocess
    import sys

    from PIL import Image

    p, _, _ = exported
    images = np.load(p["prepared"] / "test.npy")[:3]
    scans = tmp_path / "scans"
    scans.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image[0]).save(scans / f"scan{i}.png")
    (scans / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    out = tmp_path / "values.csv"
    script = (
        "import sys; from components.release.predict import main; "
        f"code = main([{str(p['out'] / 'model.onnx')!r}, {str(scans)!r}, '-o', {str(out)!r}]); "
        "assert 'torch' not in sys.modules, 'predict imported torch'; sys.exit(code)"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "values" in run.stderr and "1 unreadable" in run.stderr  # the summary line

    lines = out.read_text().splitlines()
    assert lines[0] == "path,value,error"
    rows = {line.split(",")[0].rsplit("/", 1)[-1]: line.split(",", 2)[1:] for line in lines[1:]}
    assert rows["broken.png"][0] == "" and "broken.png" in rows["broken.png"][1]
    got = np.array([float(rows[f"scan{i}.png"][0]) for i in range(3)])
    assert all(rows[f"scan{i}.png"][1] == "" for i in range(3))
    np.testing.assert_allclose(got, torch_values(p["model"], images)[:, 0], rtol=0, atol=1e-3)
