"""Regression data (data.task: regression): labels.csv targets, the manifest, splits, validate and
preprocess on synthetic scans whose target (a lesion's diameter in mm) is drawn in them."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from components import cli
from components.common import SPLITS, StageError
from components.data import demo_data, ingest, preprocess, splits, validate
from components.data.manifest import read_manifest_rows
from components.params import Params


def _labels(raw: Path) -> list[dict[str, str]]:
    with open(raw / "labels.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_regression_demo_draws_its_target_and_repeats_its_bytes(tmp_path):
    n = demo_data.generate_regression(tmp_path / "a", patients=6, seed=1, size=32, slices=2)
    demo_data.generate_regression(tmp_path / "b", patients=6, seed=1, size=32, slices=2)
    rows = _labels(tmp_path / "a")
    assert n == len(rows) == 12 and list(rows[0]) == ["path", "target", "patient_id"]
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert len({r["patient_id"] for r in rows}) == 6
    # The lesion is the bright disc: its area gives back the diameter (2.5 mm ... 5 mm a pixel at 32 px).
    targets, measured = [], []
    for r in rows:
        pixels = np.asarray(Image.open(tmp_path / "a" / r["path"]))
        measured.append(2 * np.sqrt((pixels > 160).sum() / np.pi) * demo_data.REGRESSION_FOV_MM / 32)
        targets.append(float(r["target"]))
    assert np.corrcoef(targets, measured)[0, 1] > 0.98
    assert max(targets) - min(targets) > 10  # a spread to learn, not one value


def test_demo_data_command_writes_regression_scans_and_refuses_a_batch_twice(tmp_path):
    args = ["--out", str(tmp_path), "--task", "regression", "--patients", "2", "--slices", "2", "--size", "16"]
    assert demo_data.main(args) == 0
    assert sorted(r["path"] for r in _labels(tmp_path)) == sorted(p.name for p in tmp_path.glob("*.png"))
    assert demo_data.main([*args, "--batch-name", "june"]) == 0  # new patients, numbered above the base set
    assert sorted(r["path"] for r in _labels(tmp_path)) == sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(_labels(tmp_path)) == 8 and len({r["patient_id"] for r in _labels(tmp_path)}) == 4
    assert demo_data.main([*args, "--batch-name", "june"]) == 1


def reg_params(**over) -> Params:
    """Regression params (the classification-only options set to what regression accepts)."""
    base = {
        "data": {"task": "regression", "label_source": "csv"},
        "train": {"early_stopping_metric": "val_loss"},
        "tune": {"metric": "val_loss"},
        "retrain": {"compare_metric": "mae"},
        "evaluate": {"calibration": "none", "threshold_method": "fixed"},
        "preprocess": {"image_size": 16},
    }
    for section, values in over.items():
        base.setdefault(section, {}).update(values)
    return Params.model_validate(base)


@pytest.fixture(scope="module")
def raw(module_tmp) -> Path:
    """40 synthetic patients x 2 scans at 16 px, labels.csv path,target,patient_id (read-only: copy to change)."""
    folder = module_tmp / "raw"
    demo_data.generate_regression(folder, patients=40, seed=0, size=16, slices=2)
    return folder


def _with_labels(raw: Path, tmp_path: Path, lines: list[str]) -> Path:
    """A copy of raw whose labels.csv is `lines`."""
    copy = tmp_path / "raw"
    shutil.copytree(raw, copy)
    (copy / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return copy


@pytest.mark.parametrize("bad", ["abc", "nan", "inf", "-Infinity", "", "1e999", "4,5"])
def test_a_target_that_is_not_a_finite_number_stops_ingest_naming_file_line_and_value(raw, tmp_path, bad):
    lines = (raw / "labels.csv").read_text().splitlines()
    path, _, patient = lines[3].split(",")
    lines[3] = f'{path},"{bad}",{patient}'  # quoted: "4,5" is one (European) cell
    copy = _with_labels(raw, tmp_path, lines)
    with pytest.raises(StageError) as err:
        ingest.ingest(copy, tmp_path / "data", reg_params())
    message = str(err.value)
    assert f"{copy / 'labels.csv'} line 4 ({path}): target = {bad!r}; expected a finite number" in message
    assert not (tmp_path / "data" / "manifest.csv").exists()


def test_regression_labels_csv_needs_a_target_column_not_a_label_column(raw, tmp_path):
    rows = _labels(raw)
    copy = _with_labels(raw, tmp_path, ["path,label"] + [f"{r['path']},12" for r in rows])
    with pytest.raises(StageError, match=r"missing column\(s\) \['target'\].*path,target\[,patient_id\]\[,split\]"):
        ingest.ingest(copy, tmp_path / "data", reg_params())


def test_manifest_label_is_the_canonical_target_whatever_the_spelling(raw, tmp_path):
    rows = _labels(raw)
    spelt = ["60", "6e1", " 7.50 ", "-0.25", "1_000", "+3"]
    lines = ["path,label,target,patient_id"] + [
        f"{r['path']},ignored,{spelt[i] if i < len(spelt) else r['target']},{r['patient_id']}"
        for i, r in enumerate(rows)
    ]
    copy = _with_labels(raw, tmp_path, lines)
    df = ingest.ingest(copy, tmp_path / "data", reg_params())
    labels = dict(zip(df["path"], df["label"]))
    assert [labels[r["path"]] for r in rows[: len(spelt)]] == ["60.0", "60.0", "7.5", "-0.25", "1000.0", "3.0"]
    assert all(labels[r["path"]] == repr(float(r["target"])) for r in rows[len(spelt) :])
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["task"] == "regression"
    assert manifest["counts"] == {s: {"images": int((df["split"] == s).sum())} for s in SPLITS}
    assert manifest["target_stats"]["train"]["count"] == manifest["counts"]["train"]["images"]


def _spread(df, edges: list[float]) -> None:
    """Each split holds scans from as many target bins as it can: 3 of the 4, or one per patient."""
    for split in SPLITS:
        mine = df[df["split"] == split]
        bins = {int(np.searchsorted(edges, float(v), side="right")) for v in mine["label"]}
        assert len(bins) >= min(3, mine["patient"].nunique()), (split, sorted(mine["label"]))


@pytest.mark.parametrize("method", ["stable", "stratified"])
def test_splits_keep_patients_apart_and_spread_the_targets(raw, tmp_path, method):
    df = ingest.ingest(raw, tmp_path / "data", reg_params(split={"method": method}))
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert df.groupby("patient")["split"].nunique().max() == 1
    edges = manifest["split"]["target_bin_edges"]
    assert len(edges) == 3  # 40 patients, 8 in val: 4 bins of the target, two patients each
    _spread(df, edges)
    assert "target" in manifest["split"]["method"] or "bin" in manifest["split"]["method"]


def test_fewer_target_bins_with_few_patients():
    params = reg_params()
    labels = [str(v) for v in range(40)]
    # val is the smallest split (0.2): 10 patients give it 2, one per bin for 1 bin; 20 give 4: 2 bins
    few, edges = splits.strata(labels, [f"p{i // 4}" for i in range(40)], params)
    assert set(few) == {"q1"} and edges == []
    some, edges = splits.strata(labels, [f"p{i // 2}" for i in range(40)], params)
    assert [some.count(f"q{b}") for b in (1, 2)] == [20, 20] and edges == [19.5]
    many, edges = splits.strata(labels, [f"p{i}" for i in range(40)], params)  # 40 patients: 4 bins
    assert [many.count(f"q{b}") for b in (1, 2, 3, 4)] == [10, 10, 10, 10] and len(edges) == 3
    assert splits.strata(["a", "b"], ["p", "q"], Params()) == (["a", "b"], None)  # classification: labels


def test_stable_split_keeps_old_patients_and_puts_new_ones_where_their_bin_is_short(raw, tmp_path):
    grown = tmp_path / "raw"
    shutil.copytree(raw, grown)
    first = ingest.ingest(grown, tmp_path / "data", reg_params())
    before = dict(zip(first["patient"], first["split"]))
    batch = tmp_path / "batch"
    demo_data.generate_regression(batch, patients=12, seed=0, size=16, slices=3, patient_offset=100)
    for f in batch.glob("*.png"):
        shutil.copy(f, grown / f.name)
    with open(grown / "labels.csv", "a", encoding="utf-8") as fh:
        fh.writelines(line + "\n" for line in (batch / "labels.csv").read_text().splitlines()[1:])
    second = ingest.ingest(grown, tmp_path / "data", reg_params())
    assert all(before[p] == s for p, s in zip(second["patient"], second["split"]) if p in before)
    new = second[~second["patient"].isin(before)]
    assert set(new["split"]) == set(SPLITS)  # the new patients are shared out, not all sent to train
    edges = json.loads((tmp_path / "data" / "manifest.json").read_text())["split"]["target_bin_edges"]
    _spread(second, edges)


def test_new_high_targets_reach_every_split_even_when_test_is_already_full():
    # 40 kept patients with low targets, test over its share (14 of 40); 12 new ones with high targets.
    # By image counts alone test is full and gets none of them, so it would never see a large lesion;
    # by target bin (4 here) each split gets its share of the new top bin.
    old, new = [f"old{i:02d}" for i in range(40)], [f"new{i:02d}" for i in range(12)]
    previous = {u: "train" if i < 20 else "val" if i < 26 else "test" for i, u in enumerate(old)}
    targets = [repr(float(i + 1)) for i in range(40)] + [repr(100.0 + i) for i in range(12)]
    strata, edges = splits.strata(targets, old + new, reg_params())
    assert len(edges) == 3
    out = splits.stable_split(strata, old + new, old + new, previous, reg_params())
    assert out[:40] == [previous[u] for u in old]
    assert Counter(out[40:]) == {"train": 7, "val": 3, "test": 2}


@pytest.fixture(scope="module")
def ingested(raw, module_tmp) -> Path:
    """raw ingested (stable split) into data/ of a module folder (read-only: copy to change)."""
    root = module_tmp / "ingested"
    ingest.ingest(raw, root / "data", reg_params())
    return root / "data"


def _validate(data: Path, out: Path, params: Params | None = None) -> dict:
    return validate.validate(
        data / "manifest.csv",
        data / "manifest.json",
        out / "validation.json",
        out / "validation.md",
        params or reg_params(),
    )


def _edited(ingested: Path, tmp_path: Path, edit) -> Path:
    """A copy of the ingested data whose manifest.csv rows went through edit(rows)."""
    data = tmp_path / "data"
    shutil.copytree(ingested, data)
    rows = read_manifest_rows(data / "manifest.csv")
    edit(rows)
    with open(data / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return data


def test_validate_passes_good_regression_data_and_reports_targets_per_split(ingested, tmp_path):
    report = _validate(ingested, tmp_path)
    names = {e["name"]: e for e in report["expectations"]}
    assert report["success"] and report["task"] == "regression"
    assert names["label_is_number"]["success"] and "label_in_classes" not in names
    assert names["images_per_split"]["success"] and "images_per_class_split" not in names
    assert set(report["counts"]) == set(SPLITS) and all(list(c) == ["images"] for c in report["counts"].values())
    manifest = json.loads((ingested / "manifest.json").read_text())
    assert report["target_stats"] == manifest["target_stats"]
    md = (tmp_path / "validation.md").read_text()
    assert "## Images and targets per split" in md and "| train | " in md


@pytest.mark.parametrize("label", ["abc", "inf", "nan", ""])
def test_validate_fails_a_label_that_is_not_a_finite_number(ingested, tmp_path, label):
    def edit(rows):
        rows[5]["label"] = label

    data = _edited(ingested, tmp_path, edit)
    with pytest.raises(StageError, match="critical validation") as err:
        _validate(data, tmp_path)
    report = json.loads((tmp_path / "validation.json").read_text())
    failed = {f["name"] for f in report["failures"] if f["critical"]}
    path = read_manifest_rows(data / "manifest.csv")[5]["path"]
    assert "label_is_number" in failed
    assert f"{path}: label {label or None!r} is not a finite number" in str(err.value)


def test_validate_fails_byte_identical_scans_with_different_targets(raw, tmp_path):
    rows = _labels(raw)
    copy = _with_labels(
        raw,
        tmp_path,
        ["path,target,patient_id"]
        + [f"{r['path']},{r['target']},{r['patient_id']}" for r in rows]
        + [f"copy.png,{float(rows[0]['target']) + 1},{rows[0]['patient_id']}"],
    )
    shutil.copy(copy / rows[0]["path"], copy / "copy.png")
    ingest.ingest(copy, tmp_path / "data", reg_params())
    with pytest.raises(StageError, match="duplicates_agree_on_label") as err:
        _validate(tmp_path / "data", tmp_path)
    assert "copy.png" in str(err.value) and rows[0]["path"] in str(err.value)


def test_validate_counts_images_per_split_against_the_minimum(ingested, tmp_path):
    counts = json.loads((ingested / "manifest.json").read_text())["counts"]
    least = min(c["images"] for c in counts.values())
    short = [s for s in SPLITS if counts[s]["images"] == least]
    with pytest.raises(StageError, match="images_per_split") as err:
        _validate(ingested, tmp_path, reg_params(validate={"min_images_per_class_split": least + 1}))
    assert all(f"split {s!r}: {least} image(s)" in str(err.value) for s in short)
    assert _validate(ingested, tmp_path, reg_params(validate={"min_images_per_class_split": least}))["success"]


def test_preprocess_writes_the_target_column_and_regression_meta(ingested, raw, tmp_path):
    meta = preprocess.preprocess(ingested / "manifest.csv", raw, tmp_path / "prepared", reg_params())
    manifest = json.loads((ingested / "manifest.json").read_text())
    assert meta["task"] == "regression" and meta["classes"] == [] and "class_counts" not in meta
    assert meta == json.loads((tmp_path / "prepared" / "meta.json").read_text())
    assert meta["target_stats"] == manifest["target_stats"]
    labels = {r["path"]: r["label"] for r in read_manifest_rows(ingested / "manifest.csv")}
    for split in SPLITS:
        images, index = preprocess.load_split(tmp_path / "prepared", split)
        assert images.shape == (len(index), 1, 16, 16)
        assert index["target"].dtype == np.float64 and (index["label_index"] == 0).all()
        assert list(index["target"]) == [float(labels[p]) for p in index["path"]]
        stats = meta["target_stats"][split]
        assert stats["count"] == len(index) and stats["mean"] == pytest.approx(index["target"].mean())
        assert stats["std"] == pytest.approx(index["target"].std(ddof=0))
        assert (stats["min"], stats["max"]) == (index["target"].min(), index["target"].max())
    header = (tmp_path / "prepared" / "index.csv").read_text().splitlines()[0]
    assert header == "split,row,path,sha256,label,label_index,patient,target"


def test_preprocess_refuses_a_label_that_is_not_a_number(ingested, raw, tmp_path):
    def edit(rows):
        rows[2]["label"] = "big"

    data = _edited(ingested, tmp_path, edit)
    with pytest.raises(StageError, match=r"has label 'big'; expected a finite number"):
        preprocess.preprocess(data / "manifest.csv", raw, tmp_path / "prepared", reg_params())
    assert not (tmp_path / "prepared").exists()


def test_medtune_ingest_validate_preprocess_on_generated_regression_data(tmp_path, monkeypatch):
    # `medtune ingest && medtune validate && medtune preprocess`, through the medtune command itself
    # (in this process: three interpreters would spend most of the test importing).
    demo_data.generate_regression(tmp_path / "data" / "raw", patients=12, seed=3, size=16, slices=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(reg_params().to_dict(), sort_keys=False))
    monkeypatch.chdir(tmp_path)
    assert [cli.main([stage]) for stage in ("ingest", "validate", "preprocess")] == [0, 0, 0]
    index = (tmp_path / "data" / "prepared" / "index.csv").read_text().splitlines()
    assert index[0].endswith(",target") and len(index) == 1 + 24
    meta = json.loads((tmp_path / "data" / "prepared" / "meta.json").read_text())
    assert meta["task"] == "regression" and sum(s["count"] for s in meta["target_stats"].values()) == 24
    assert json.loads((tmp_path / "reports" / "validation.json").read_text())["success"]
