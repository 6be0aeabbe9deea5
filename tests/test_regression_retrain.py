"""Retraining a regression (data.task: regression): the inbox reads a batch's `path,target[,patient_id]`
labels.csv, quarantines a batch whose target is not a number with a report naming file, line and value,
and appends the targets to the raw labels.csv; then one real `medtune retrain --once` (a real Prefect
server, DVC and git, a trained challenger) judged against a champion on MAE, lower being better."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from components.data import demo_data
from components.data.ingest import ingest
from components.data.manifest import read_manifest
from components.params import parse_params
from components.release import registry
from components.retrain import inbox, raw_append
from tests.workspace import (
    FAST,
    RETRAIN_TIMEOUT,
    TEST_SALT,
    drop_batch,
    make_workspace,
    merge,
    retrain,
    run,
    tree_digest,
)

# The options of a classification that a regression refuses, set to what it accepts.
REGRESSION = {
    "data": {"task": "regression", "label_source": "csv"},
    "retrain": {"compare_metric": "mae"},
    "evaluate": {"calibration": "none", "threshold_method": "fixed"},
}
PARAMS = parse_params(
    merge(REGRESSION, {"split": {"seed": 1, "val_fraction": 0.25, "test_fraction": 0.3}, "validate": {"min_size": 16}})
)


def check(batch: Path, manifest: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    rows, problems = inbox.read_batch(batch, PARAMS)
    mine = raw_append.appended_paths(batch.name, rows, PARAMS) if len(rows) else []
    return rows, problems + inbox.check_batch(batch, rows, manifest, PARAMS, mine)


@pytest.fixture()
def raw(tmp_path):
    """Raw regression data of 8 synthetic patients (labels.csv path,target,patient_id) and its real manifest."""
    raw = tmp_path / "raw"
    demo_data.generate_regression(raw, patients=8, seed=0, size=32, slices=2)
    ingest(raw, tmp_path / "data", PARAMS)
    return raw, read_manifest(tmp_path / "data/manifest.csv")


def new_batch(folder: Path, patients: int = 3) -> Path:
    demo_data.generate_regression(folder, patients=patients, seed=0, size=32, slices=2, patient_offset=500)
    return folder


def test_a_regression_batch_is_checked_and_appended_with_its_targets(raw, tmp_path):
    raw_dir, manifest = raw
    batch = new_batch(tmp_path / "inbox/2024-06")
    labels = (batch / "labels.csv").read_text().splitlines()
    first = labels[1].split(",")
    labels[1] = ",".join([first[0], "4.50e1", first[2]])  # the canonical text of 45 is 45.0, however spelt
    (batch / "labels.csv").write_text("\n".join(labels) + "\n")
    given = {line.split(",")[0]: line.split(",") for line in labels[1:]}

    rows, problems = check(batch, manifest)
    assert problems == []
    assert len(rows) == 6 and (rows["patient"] != "").all() and not rows["patient"].isin(manifest["patient"]).any()
    assert dict(zip(rows["path"], rows["label"])) == {p: repr(float(v[1])) for p, v in given.items()}
    assert rows.set_index("path").loc[first[0], "label"] == "45.0"
    summary = inbox.summary_table(rows, regression=True)
    values = [float(v[1]) for v in given.values()]
    assert summary == [{"split": "(pipeline)", "files": 6, "target_min": min(values), "target_max": max(values)}]

    before = tree_digest(raw_dir)
    old_labels = (raw_dir / "labels.csv").read_text()
    dests = raw_append.append_to_raw(batch, rows, raw_dir, PARAMS)
    assert dests == [f"2024-06/{p}" for p in rows["path"]]
    after = tree_digest(raw_dir)
    assert all(after[k] == v for k, v in before.items() if k != "labels.csv")
    text = (raw_dir / "labels.csv").read_text()
    assert text.startswith(old_labels)  # existing lines byte for byte, then the batch's
    new_lines = text[len(old_labels) :].splitlines()
    assert new_lines == [f"2024-06/{p},{repr(float(given[p][1]))},{given[p][2]}" for p in rows["path"]]
    assert raw_append.append_to_raw(batch, rows, raw_dir, PARAMS) == dests and tree_digest(raw_dir) == after

    # The real ingest reads the appended targets and patients as the batch check did.
    m = ingest(raw_dir, tmp_path / "data2", PARAMS).set_index("path")
    for r in rows.itertuples():
        assert m.loc[f"2024-06/{r.path}", "label"] == r.label and m.loc[f"2024-06/{r.path}", "patient"] == r.patient

    # The undo of a failed run takes out exactly the batch's files and lines.
    assert sorted(raw_append.remove_from_raw(raw_dir, dests, PARAMS)) == sorted(dests)
    assert tree_digest(raw_dir) == {**before, "labels.csv": old_labels.encode()}


@pytest.mark.parametrize("value", ["n/a", "inf", ""])
def test_a_target_that_is_no_number_quarantines_the_batch_naming_file_line_and_value(raw, tmp_path, value):
    _, manifest = raw
    batch = new_batch(tmp_path / "inbox/bad", patients=2)
    lines = (batch / "labels.csv").read_text().splitlines()
    path, _, patient = lines[3].split(",")
    lines[3] = f"{path},{value},{patient}"
    (batch / "labels.csv").write_text("\n".join(lines) + "\n")
    before = tree_digest(batch)

    rows, problems = check(batch, manifest)
    expected = (
        f"{batch / 'labels.csv'} line 4 ({path}): target = {value!r}; expected a finite number "
        "(data.task is regression), e.g. 42 or 3.5."
    )
    assert problems[0] == expected, problems
    dest = inbox.quarantine(batch, tmp_path / "quarantine", problems)
    assert not batch.exists() and tree_digest(dest / "batch") == before
    assert json.loads((dest / "report.json").read_text())["problems"][0] == expected
    assert f"- {expected}" in (dest / "report.md").read_text()


def test_a_regression_batch_without_targets_is_refused_file_by_file(raw, tmp_path):
    _, manifest = raw
    batch = new_batch(tmp_path / "inbox/half", patients=2)
    lines = (batch / "labels.csv").read_text().splitlines()
    (batch / "labels.csv").write_text("\n".join(lines[:-1]) + "\n")  # the last scan has no row
    missing = lines[-1].split(",")[0]
    _, problems = check(batch, manifest)
    assert problems == [f"{batch / missing}: no target; expected a labels.csv row path,target with a finite number."]

    (batch / "labels.csv").write_text("path,label\n" + "".join(f"{ln.split(',')[0]},7\n" for ln in lines[1:]))
    _, problems = check(batch, manifest)
    assert problems[0] == (
        f"{batch / 'labels.csv'}: missing column(s) ['target']; found ['path', 'label'], expected a header line "
        "path,target[,patient_id][,split]."
    )
    (batch / "labels.csv").unlink()
    _, problems = check(batch, manifest)
    assert problems[0].startswith(f"{batch / 'labels.csv'}: not found; expected labels.csv with path,target")
    assert len(problems) == 1 + 4 and all("no target" in p for p in problems[1:])
    for f in batch.iterdir():
        f.unlink()
    assert check(batch, manifest)[1][1:] == [f"{batch}: no scans found; expected files plus labels.csv."]


def test_where_raw_labels_give_splits_a_batch_must_give_them_too(tmp_path):
    """A raw labels.csv with a split column refuses an empty split (ingest); the batch check says so
    before the append instead of the whole-data ingest failing after it."""
    raw = tmp_path / "raw"
    demo_data.generate_regression(raw, patients=12, seed=0, size=32, slices=2)
    lines = (raw / "labels.csv").read_text().splitlines()
    splits = ["train", "train", "val", "test"]
    given = [f"{line},{splits[n // 2 % 4]}" for n, line in enumerate(lines[1:])]
    (raw / "labels.csv").write_text("\n".join([lines[0] + ",split", *given]) + "\n")
    manifest = ingest(raw, tmp_path / "data", PARAMS)
    batch = new_batch(tmp_path / "inbox/2024-07", patients=2)

    rows, problems = inbox.read_batch(batch, PARAMS)
    problems += inbox.check_batch(batch, rows, manifest, PARAMS, raw_labels=raw / "labels.csv")
    assert problems == [
        f"{batch}: 4 scan(s) have no split (case501_00.png, case501_01.png, case502_00.png, ...); "
        f"{raw / 'labels.csv'} gives every scan its split (column split), so the batch's labels.csv must too: "
        "expected a split column with train, val or test on each row."
    ]

    batch_lines = (batch / "labels.csv").read_text().splitlines()
    (batch / "labels.csv").write_text(
        "\n".join([batch_lines[0] + ",split", *(f"{line},train" for line in batch_lines[1:])]) + "\n"
    )
    rows, problems = inbox.read_batch(batch, PARAMS)
    assert problems + inbox.check_batch(batch, rows, manifest, PARAMS, raw_labels=raw / "labels.csv") == []
    raw_append.append_to_raw(batch, rows, raw, PARAMS)
    m = ingest(raw, tmp_path / "data2", PARAMS).set_index("path")
    assert (m.loc[[f"2024-07/{p}" for p in rows["path"]], "split"] == "train").all()


# One real retrain run: a regression project (12 synthetic patients, 32 px, backbone none, 1 epoch), a
# champion that always says CHAMPION_MM, and a batch of 4 new patients in the inbox.
CHAMPION_ID, CHAMPION_MM = "c0ffee000001", 0.0


def constant_onnx(path: Path, value: float, channels: int, size: int) -> None:
    """A regression model's ONNX graph (input `image` N x channels x size x size, output `value` (N, 1))
    that gives `value` for every image, so its MAE on any test set is known exactly."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    consts = {"zero": np.float32(0), "constant": np.float32(value), "shape": np.array([-1, 1], np.int64)}
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2, 3], keepdims=1),
            helper.make_node("Reshape", ["mean", "shape"], ["flat"]),
            helper.make_node("Mul", ["flat", "zero"], ["nothing"]),
            helper.make_node("Add", ["nothing", "constant"], ["value"]),
        ],
        "constant",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", channels, size, size])],
        [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(np.asarray(v), name=k) for k, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)  # ORT's range
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def artifact_rows(api: str, key: str) -> list[dict]:
    """The latest table artifact `key` on the server (plain REST, as tests/test_flows.py reads them)."""
    req = urllib.request.Request(
        f"{api}/artifacts/filter",
        method="POST",
        headers={"content-type": "application/json"},
        data=json.dumps({"limit": 10, "artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC"}).encode(),
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        found = json.load(r)
    assert found, f"no artifact {key}"
    data = found[0]["data"]
    return json.loads(data) if isinstance(data, str) else data


@pytest.fixture(scope="module")
def retrained(salt_free_server, module_tmp) -> dict:
    env = {**salt_free_server["env"], "MEDTUNE_PATIENT_SALT": TEST_SALT}  # the demo's patient ids hashed with a secret
    ws = module_tmp / "ws"
    over = {
        "retrain": {"dvc_remote": "../dvc-remote", "promotion_margin": 0.0},
        # 1 epoch: the test is the record, not the model. No probe or Grad-CAM samples: seconds saved.
        "evaluate": {"gate": {"min_r2": None, "max_mae": None}, "linear_probe": False, "explain_per_group": 0},
    }
    make_workspace(ws, patients=12, params=merge(merge(FAST, REGRESSION), over), env=env)
    p = parse_params(yaml.safe_load((ws / "params.yaml").read_text()))
    constant_onnx(
        ws / "registry/models" / CHAMPION_ID / "model.onnx", CHAMPION_MM, p.preprocess.channels, p.preprocess.image_size
    )
    (ws / "registry/current.json").write_text(json.dumps({"model_id": CHAMPION_ID, "git_tag": None}))
    (ws / ".gitignore").write_text("/models/\n/reports/\n/data/inbox\n/data/quarantine\n/data/inbox-processed\n")
    run(["git", "add", "-A"], ws, env, timeout=RETRAIN_TIMEOUT)
    run(["git", "commit", "-qm", "regression data and a constant champion"], ws, env, timeout=RETRAIN_TIMEOUT)
    drop_batch(ws, env)
    out = retrain(ws, env, check=False)
    return {"ws": ws, "env": env, "out": out, "api": env["PREFECT_API_URL"], "params": p}


@pytest.mark.slow
def test_a_regression_retrain_promotes_on_mae_and_records_the_comparison(retrained):
    ws, out = retrained["ws"], retrained["out"]
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    event = registry.releases(ws)[-1]
    comparison = event["comparison"]
    assert comparison["metric"] == "mae" and comparison["margin"] == 0.0
    # The champion's MAE is |target - CHAMPION_MM| over the shared test images (no champion manifest: all).
    index = pd.read_csv(ws / "data/prepared/index.csv")
    test = index[index["split"] == "test"]
    assert comparison["n_compared"] == len(test) > 0
    assert comparison["champion_value"] == pytest.approx(np.mean(np.abs(test["target"] - CHAMPION_MM)), rel=1e-5)
    assert comparison["challenger_value"] == comparison["challenger"]["mae"]
    assert event["champion"]["model_id"] == CHAMPION_ID
    assert any("(lower is better)" in r and "challenger mae" in r for r in event["reasons"]), event["reasons"]
    # Lower is better: promoted iff the challenger's MAE is at most the champion's (margin 0). A model that
    # learnt anything beats one that says 0 mm for a lesion of some 30 mm; a refusal is checked as well.
    mid, env = event["model_id"], retrained["env"]
    tags = run(["git", "tag", "-l", f"model-{mid}"], ws, env).stdout.split()
    if comparison["challenger_value"] <= comparison["champion_value"]:
        assert event["event"] == "promoted" and '"outcome": "promoted"' in out.stdout
        assert registry.current(ws) == {"model_id": mid, "git_tag": f"model-{mid}"} and tags == [f"model-{mid}"]
    else:
        assert event["event"] == "rejected" and '"outcome": "kept-champion"' in out.stdout
        assert registry.current(ws) == {"model_id": CHAMPION_ID, "git_tag": None} and tags == []
    assert run(["git", "status", "--porcelain"], ws, env).stdout == ""
    evaluation = json.loads((ws / "reports/evaluation.json").read_text())
    assert evaluation["task"] == "regression" and evaluation["mae"] == event["challenger"]["metrics"]["mae"]

    # The batch's targets went into the raw labels.csv and, canonical, into the manifest.
    labels = pd.read_csv(ws / "data/raw/labels.csv", dtype=str)
    batch = labels[labels["path"].str.startswith("batch-2024-06/")]
    assert len(batch) == 12 and list(labels.columns) == ["path", "target", "patient_id"]
    manifest = read_manifest(ws / "data/manifest.csv").set_index("path")
    assert all(manifest.loc[r.path, "label"] == repr(float(r.target)) for r in batch.itertuples())
    assert not list((ws / "data/inbox").iterdir())

    # What the Prefect UI shows: MAE, RMSE and R^2 with their intervals, for both models.
    api = retrained["api"]
    targets = batch["target"].astype(float)
    assert artifact_rows(api, "medtune-new-batches") == [
        {
            "batch": "batch-2024-06",
            "split": "(pipeline)",
            "files": 12,
            "target_min": targets.min(),
            "target_max": targets.max(),
        }
    ]
    table = {r["metric"]: r for r in artifact_rows(api, "medtune-champion-vs-challenger")}
    assert list(table) == ["mae", "mae_ci", "rmse", "rmse_ci", "r2", "r2_ci", "n_test"]
    assert table["mae"]["champion (shared test)"] == pytest.approx(comparison["champion_value"])
    assert table["mae"]["challenger (shared test)"] == pytest.approx(comparison["challenger_value"])
    lo, hi = json.loads(table["mae_ci"]["challenger (full test)"])
    assert lo <= evaluation["mae"] <= hi
    metrics = {r["metric"]: r["value"] for r in artifact_rows(api, "medtune-metrics")}
    assert {"mae", "mae_ci_low", "mae_ci_high", "rmse", "r2", "n_test"} <= set(metrics) and "auroc" not in metrics
    assert metrics["mae"] == pytest.approx(evaluation["mae"])
