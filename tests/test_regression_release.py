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
def exported(module_tmp):
    """One regression model exported by the real export stage (random weights, a linear probe recorded),
    evaluated and exported with test-time augmentation hflip."""
    params = regression_params(tta="hflip")
    p = make_regression_project(module_tmp, tta="hflip")
    report = run_export(p, params)
    return p, params, report


def test_the_onnx_graph_gives_head_times_std_plus_mean_and_records_the_stats(exported):
    """The values are the head's, averaged over the image and its mirror (tta hflip), times the train
    targets' std plus their mean, all inside the graph; the metadata and lineage record the two."""
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
        np.testing.assert_allclose(got, torch_values(p["model"], batch, "hflip"), rtol=0, atol=1e-3)
    assert np.abs(got - torch_values(p["model"], batch)).max() > 1e-3  # the mirror did change the values
    # Values in target units: around the targets' mean, not the standardised output around 0.
    assert abs(float(got.mean()) - TARGET_MEAN) < 5 * TARGET_STD and abs(float(got.mean())) > 10

    meta = read_metadata(onnx_path)
    assert meta["task"] == "regression" and meta["output"] == "value" and meta["classes"] == []
    assert meta["target_mean"] == TARGET_MEAN and meta["target_std"] == TARGET_STD
    assert meta["metrics"]["task"] == "regression"
    assert {prop.key for prop in onnx.load(str(onnx_path)).metadata_props} >= {"task", "target_mean", "target_std"}

    # Parity on values, with the tolerance in target units.
    # (plus a few float32 steps at the size of the mean, which the graph adds in float32)
    assert report["value_tolerance"] == pytest.approx(params.export.value_tolerance * TARGET_STD, rel=0.05)
    assert report["max_abs_diff_batchN"] <= report["value_tolerance"]
    lineage = json.loads((p["out"] / "lineage.json").read_text())
    assert lineage["target"] == {"mean": TARGET_MEAN, "std": TARGET_STD}


def test_parity_on_values_is_judged_in_target_sds_by_export_value_tolerance(tmp_path, monkeypatch):
    """A trained regression's float32 differences between ONNX Runtime and PyTorch reach a few 1e-4 of
    the targets' SD (0.0033 mm at an SD of 11.5 on the regression demo): export.value_tolerance (1e-3
    SDs) ships such a graph, which export.tolerance, a tolerance on probabilities, would have refused;
    a tighter value_tolerance refuses it, naming the key, the SD and the limit."""
    from components.common import StageError
    from components.release import export

    seen = 3.3e-4 * TARGET_STD  # the size of a difference seen on a trained model, in target units
    monkeypatch.setattr(export, "parity", lambda *args: seen)
    assert seen > regression_params().export.tolerance * TARGET_STD
    report = run_export(make_regression_project(tmp_path / "a"), regression_params())
    assert report["max_abs_diff_batchN"] == seen < report["value_tolerance"]

    params = regression_params()
    strict = params.model_copy(update={"export": params.export.model_copy(update={"value_tolerance": 1e-4})})
    with pytest.raises(
        StageError,
        match=r"max \|diff\| of values 0\.00404 .* export\.value_tolerance 0\.0001 x the train targets' SD 12\.2\d*, 0\.0012",
    ):
        run_export(make_regression_project(tmp_path / "b"), strict)


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
    np.testing.assert_allclose(got, torch_values(p["model"], images, "hflip")[:, 0], rtol=0, atol=1e-3)


def shifted_onnx(src, dst, delta: float) -> None:
    """The ONNX model `src` with `delta` added to its value: a real graph that is better or worse than it."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(src))
    out = proto.graph.output[0]
    inner = out.name + "_unshifted"
    for node in proto.graph.node:
        node.output[:] = [inner if o == out.name else o for o in node.output]
    proto.graph.initializer.append(numpy_helper.from_array(np.array([delta], np.float32), "shift"))
    proto.graph.node.append(helper.make_node("Add", [inner, "shift"], [out.name]))
    onnx.checker.check_model(proto)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(dst))


def challenger_workspace(root, exported, delta: float, champion_delta: float):
    """A workspace whose champion (registry/current.json) is the exported model shifted by `champion_delta`
    and whose challenger (models/, reports/) is it shifted by `delta`, on the exported project's test split."""
    import shutil

    from components import common

    p, _, _ = exported
    shutil.copytree(p["prepared"], root / "data" / "prepared")
    champion = "c0ffee000001"
    (root / "registry" / "models" / champion).mkdir(parents=True)
    shifted_onnx(p["out"] / "model.onnx", root / "registry" / "models" / champion / "model.onnx", champion_delta)
    common.write_json(root / "registry" / "current.json", {"model_id": champion, "git_tag": f"model-{champion}"})
    (root / "models").mkdir()
    (root / "models" / "model.pt").write_bytes(f"challenger {delta}".encode())
    mid = common.sha256_file(root / "models" / "model.pt")[:12]
    shifted_onnx(p["out"] / "model.onnx", root / "models" / "model.onnx", delta)
    common.write_json(root / "models" / "lineage.json", {"model_id": mid})  # no code record: not checked here
    shutil.copytree(p["reports"], root / "reports")
    return root


@pytest.mark.parametrize("metric", ["mae", "r2"])  # rmse goes the way mae does (judge, below)
def test_the_challenger_is_judged_in_the_metrics_direction(exported, tmp_path, metric):
    """On the same test images, a challenger nearer the targets is promoted and one further away is not,
    whether lower (mae, rmse) or higher (r2) is better; each reason names the direction."""
    import onnxruntime as ort

    from components.retrain.challenger import compare

    p, params, _ = exported
    images = np.load(p["prepared"] / "test.npy").astype(np.float32) / 255.0
    session = ort.InferenceSession(str(p["out"] / "model.onnx"), providers=["CPUExecutionProvider"])
    # The shift that minimises the MAE (the residuals' median); the champion is 15 off it, the challengers
    # 0 (nearer the targets) and 30 (further).
    best = float(np.median(p["y"] - session.run(["value"], {"image": images})[0][:, 0]))
    direction = "(higher is better)" if metric == "r2" else "(lower is better)"
    outcomes = {}
    for name, delta in (("nearer", best), ("further", best + 30)):
        ws = challenger_workspace(tmp_path / name, exported, delta, best + 15)
        decision = compare(ws, params, metric, 0.0)
        comparison = decision["comparison"]
        a, b = comparison["challenger_value"], comparison["champion_value"]
        assert comparison["n_compared"] == len(p["y"]) and set(comparison["challenger"]) >= {"mae", "rmse", "r2"}
        assert a < b if (name == "nearer") == (metric != "r2") else a > b, (name, a, b)
        assert any(direction in r for r in decision["reasons"]), decision["reasons"]
        outcomes[name] = decision["promote"]
    assert outcomes == {"nearer": True, "further": False}


def test_the_margin_is_added_to_an_error_and_taken_from_a_score():
    from components.retrain.challenger import judge

    assert judge("mae", 5.4, 5.0, 0.5, 10)[0] and not judge("mae", 5.6, 5.0, 0.5, 10)[0]
    assert judge("rmse", 4.0, 5.0, 0.0, 10)[0] and not judge("rmse", float("nan"), 5.0, 0.5, 10)[0]
    assert judge("r2", 0.65, 0.7, 0.1, 10)[0] and not judge("r2", 0.55, 0.7, 0.1, 10)[0]
    ok, why = judge("mae", 5.4, 5.0, 0.5, 10)
    assert why == "challenger mae 5.4000 <= champion 5.0000 + margin 0.5 on 10 shared test images (lower is better)"
    assert "worse than champion" in judge("r2", 0.5, 0.7, 0.1, 10)[1]
    # a classification metric keeps its message
    assert (
        judge("auroc", 0.9, 0.8, 0.01, 4)[1]
        == "challenger auroc 0.9000 >= champion 0.8000 - margin 0.01 on 4 shared test images"
    )


def test_the_card_trace_and_report_show_mae_rmse_r2_with_intervals_and_no_auroc(exported):
    from components.audit.report import report
    from components.audit.trace import trace
    from components.audit.trace_text import render

    p, _, exported_report = exported
    record = json.loads((p["reports"] / "evaluation.json").read_text())
    mae, (lo, hi), gain = record["mae"], record["mae_ci"], record["linear_probe"]["mae_gain"]
    card = (p["out"] / "model_card.md").read_text()
    assert f"| MAE | {mae:.4g} | {lo:.4g} to {hi:.4g} (bootstrap) |" in card
    assert "| RMSE |" in card and f"| R^2 | {record['r2']:.4g} |" in card
    assert f"**{gain:+.4g}**" in card and "probe MAE - model MAE" in card
    assert f"x {TARGET_STD:g} + {TARGET_MEAN:g}" in card  # the de-standardisation the graph applies
    assert "AUROC" not in card and "Confusion" not in card and "threshold" not in card

    root = p["out"].parent
    lineage = trace(p["out"] / "model.onnx", root)
    assert lineage["export"]["value_tolerance"] == exported_report["value_tolerance"]  # the limit applied
    text = render(lineage)
    assert f"MAE {mae:.4g} (95% CI {lo:.4g} - {hi:.4g})" in text and "R^2 " in text and "RMSE " in text
    assert f"= {gain:+.3f}" in text and "fine-tuning lowered the error" in text
    evaluation = text[text.index("9. Evaluation") : text.index("10. Export")]
    assert "auroc" not in evaluation.lower() and "MAE" in evaluation

    (p["reports"] / "scatter.csv").write_text("true,predicted\n" + "".join(f"{y},{y + 1.5}\n" for y in p["y"]))
    html, summary = report(p["out"] / "model.onnx", root)
    assert "<td>MAE</td>" in html and "<td>R^2</td>" in html and "MAE gain, probe minus fine-tuned" in html
    assert "Predicted vs true" in html and "ROC" not in html and "AUROC" not in html
    assert summary["evidence"]["scatter"] == "workspace" and "roc" not in summary["evidence"]


def test_drift_compares_the_targets_not_one_class_per_value():
    from components.audit.drift import drift

    def rows(values, prefix):
        return [
            {"path": f"{prefix}{i}.png", "sha256": f"{prefix}{i}", "label": repr(v), "width": "32", "height": "32"}
            for i, v in enumerate(values)
        ]

    out = drift(rows([50.0, 60.0, 70.0, 80.0], "n"), rows([40.0, 50.0, 60.0], "o"), regression=True)
    assert "class_balance" not in out
    assert out["target"]["previous"] == {"n": 3, "min": 40.0, "median": 50.0, "mean": 50.0, "max": 60.0}
    assert out["target"]["current"]["median"] == 65.0
    assert out["summary"][0] == "target median 50 -> 65, mean 50 -> 65"


def test_a_regression_champion_is_warm_started_by_a_regression_retrain_only(exported, tmp_path):
    import shutil

    from components import common
    from components.params import parse_params
    from components.release.registry import warm_start_plan

    p, _, _ = exported
    mid = common.sha256_file(p["model"])[:12]
    (tmp_path / "registry" / "models" / mid).mkdir(parents=True)
    shutil.copyfile(p["model"], tmp_path / "registry" / "models" / mid / "model.pt")
    common.write_json(tmp_path / "registry" / "current.json", {"model_id": mid, "git_tag": f"model-{mid}"})
    shape = {"preprocess": {"image_size": 32}, "train": {"backbone": "none"}}
    regression = parse_params(
        {**shape, "data": {"task": "regression", "label_source": "csv"}, "retrain": {"compare_metric": "mae"}}
    )
    plan = warm_start_plan(tmp_path, regression)
    assert plan["init_from"] == common.sha256_file(p["model"]), plan["reason"]
    plan = warm_start_plan(tmp_path, parse_params(shape))  # a classification retrain
    assert plan["init_from"] is None and "task" in plan["reason"], plan["reason"]


def test_models_list_shows_a_regression_by_its_mae_and_r2():
    from components.audit.history import render_models
    from components.release.records import key_metrics

    lineage = {"evaluation": {"metrics": {"mae": 3.25, "mae_ci": [2.5, 4.0], "rmse": 4.0, "r2": 0.61, "n_test": 9}}}
    metrics = key_metrics(lineage)
    assert metrics == {"mae": 3.25, "mae_ci": [2.5, 4.0], "rmse": 4.0, "r2": 0.61}
    row = {
        "model_id": "abc123",
        "date": "2026-11-27",
        "data_version": "d" * 20,
        "metrics": metrics,
        "gate": True,
        "status": "promoted",
        "git_tag": None,
        "current": True,
    }
    line = render_models([row]).splitlines()[1]
    assert "mae 3.250 [2.500, 4.000]" in line and "r2 0.610" in line
    classifier = {**row, "metrics": key_metrics({"evaluation": {"metrics": {"auroc": 0.9, "auroc_ci": [0.8, 1.0]}}})}
    assert "0.900 [0.800, 1.000]" in render_models([classifier]).splitlines()[1]
