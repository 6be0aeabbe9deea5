"""Stage 1: manifest contents, patient-level split, labels.csv, patient_pattern, unreadable files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components import common
from components.data import demo_data
from components.data.ingest import COLUMNS, NO_PATIENT, ingest, main
from components.params import parse_params

CLASSES = ["normal", "lesion"]


def params(**data):
    split = data.pop("split", {"seed": 7, "val_fraction": 0.2, "test_fraction": 0.25})
    return parse_params({"data": data, "split": split})


@pytest.fixture(scope="module")
def demo_raw(module_tmp) -> Path:
    raw = module_tmp / "raw"
    demo_data.generate(raw, patients=20, slices=3, size=16, seed=0, classes=CLASSES)
    return raw


def png(path: Path, value: int = 100, size: int = 16, mode: str = "L", fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value if mode == "L" else (value,) * 3).save(path, format=fmt)


def png_set(raw: Path, patients: int = 10, per_patient: int = 2) -> list[tuple[str, str, str]]:
    """PNG files named p<NN>_<k>.png, label by patient parity; returns (path, label, patient)."""
    rows = []
    for p in range(patients):
        label = CLASSES[p % 2]
        for k in range(per_patient):
            rel = f"{label}/p{p:02d}_{k}.png"
            png(raw / rel, value=4 * p + k)  # distinct bytes: no accidental duplicates
            rows.append((rel, label, f"p{p:02d}"))
    return rows


def test_demo_manifest_contract_and_patient_split(demo_raw, tmp_path):
    df = ingest(demo_raw, tmp_path, params())
    csv = pd.read_csv(tmp_path / "manifest.csv", dtype=str, keep_default_na=False)
    meta = json.loads((tmp_path / "manifest.json").read_text())
    assert list(csv.columns) == COLUMNS and len(csv) == len(df) == 60
    assert list(csv["path"]) == sorted(csv["path"])
    assert set(csv["split"]) == {"train", "val", "test"} and set(csv["error"]) == {""}
    assert csv["patient"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert set(csv["modality"]) == {"CT"} and set(csv["bit_depth"]) == {"16"} and set(csv["width"]) == {"16"}
    # Patient-level: each of the 20 patients sits in exactly one split.
    assert csv.groupby("patient")["split"].nunique().max() == 1 and csv["patient"].nunique() == 20
    # Class-balanced and sized roughly as asked (20 patients: coarse, so generous bounds).
    overall = (csv["label"] == "lesion").mean()
    for split, share in (("test", 0.25), ("val", 0.15), ("train", 0.6)):
        part = csv[csv["split"] == split]
        assert abs(len(part) / len(csv) - share) < 0.12, split
        assert abs((part["label"] == "lesion").mean() - overall) < 0.2, split
    listing = "".join(f"{p}  {h}\n" for p, h in zip(csv["path"], csv["sha256"]))
    assert meta["content_hash"] == hashlib.sha256(listing.encode()).hexdigest()
    assert meta["n_images"] == 60 and meta["n_unreadable"] == 0 and meta["data_version"] == "untracked"
    assert meta["patient_source"] == "DICOM PatientID" and meta["warnings"] == []
    assert meta["split"]["source"] == "stable" and meta["split"]["patient_overlap"] == 0
    assert sum(meta["split"]["patients"].values()) == 20
    assert sum(sum(c.values()) for c in meta["counts"].values()) == 60
    assert meta["counts"]["test"]["lesion"] == int(((csv["split"] == "test") & (csv["label"] == "lesion")).sum())


def test_split_is_deterministic_for_a_seed(demo_raw, tmp_path):
    ingest(demo_raw, tmp_path / "a", params())
    ingest(demo_raw, tmp_path / "b", params())
    other = ingest(demo_raw, tmp_path / "c", params(split={"seed": 8, "val_fraction": 0.2, "test_fraction": 0.25}))
    for name in ("manifest.csv", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert list(pd.read_csv(tmp_path / "a/manifest.csv")["split"]) != list(other["split"])


def test_stable_split_keeps_every_image_in_place_through_ten_appends_and_stays_balanced(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "data"
    png_set(raw, patients=20)
    first = ingest(raw, out, params()).set_index("path")["split"]
    seen = first
    for batch in range(10):  # ten batches of six new patients each
        for p in range(20 + 6 * batch, 26 + 6 * batch):
            noise = np.random.default_rng(p).integers(0, 255, (16, 16), dtype=np.uint8)
            (raw / CLASSES[p % 2]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(noise).save(raw / CLASSES[p % 2] / f"p{p:02d}_0.png")
        now = ingest(raw, out, params()).set_index("path")["split"]
        assert (now[seen.index] == seen).all(), f"an existing image changed split at append {batch + 1}"
        seen = now
    # 80 images: each split near its share, each class near its overall share within each split.
    for split, share in (("train", 0.55), ("val", 0.2), ("test", 0.25)):
        part = now[now == split]
        assert abs(len(part) / len(now) - share) <= 0.05, split
        lesion = part.index.str.startswith("lesion/").mean()
        assert abs(lesion - 0.5) <= 0.1, split
    assert json.loads((out / "manifest.json").read_text())["split"]["source"] == "stable"
    # The stratified k-fold, by contrast, is recomputed from all the data each time.
    stratified = {"method": "stratified", "seed": 7, "val_fraction": 0.2, "test_fraction": 0.25}
    assert not (
        ingest(raw, tmp_path / "cv", params(split=stratified)).set_index("path")["split"][first.index] == first
    ).all()


def test_a_given_train_test_split_gets_validation_patients_from_train_only(tmp_path):
    raw = tmp_path / "raw"
    rows = png_set(raw, patients=20)
    given = {r[0]: ("test" if int(r[2][1:]) % 4 == 0 else "train") for r in rows}
    (raw / "labels.csv").write_text("path,label,split\n" + "".join(f"{p},{lab},{given[p]}\n" for p, lab, _ in rows))
    df = ingest(raw, tmp_path / "data", params(label_source="csv", patient_pattern="^(?P<patient>p\\d+)_")).set_index(
        "path"
    )
    assert all(df.loc[p, "split"] == "test" for p, s in given.items() if s == "test")
    carved = [p for p, s in given.items() if s == "train" and df.loc[p, "split"] == "val"]
    assert carved and len(carved) < sum(s == "train" for s in given.values()) / 2
    assert "carved from its train split" in json.loads((tmp_path / "data/manifest.json").read_text())["split"]["method"]


def test_data_version_and_salt(demo_raw, tmp_path, monkeypatch):
    (demo_raw.parent / "raw.dvc").write_text("outs:\n- md5: abc123.dir\n  path: raw\n")
    try:
        first = ingest(demo_raw, tmp_path / "a", params())
        assert json.loads((tmp_path / "a/manifest.json").read_text())["data_version"] == "abc123.dir"
    finally:
        (demo_raw.parent / "raw.dvc").unlink()
    monkeypatch.setenv("MEDTUNE_PATIENT_SALT", "a-real-secret")
    second = ingest(demo_raw, tmp_path / "b", params())
    assert not set(first["patient"]) & set(second["patient"])


def test_labels_csv_split_column_wins(tmp_path):
    raw = tmp_path / "raw"
    rows = png_set(raw, patients=4)
    wanted = {"p00": "test", "p01": "test", "p02": "val", "p03": "train"}
    pd.DataFrame(
        [{"path": r, "label": lab, "patient_id": f"ID-{pt}", "split": wanted[pt]} for r, lab, pt in rows]
    ).to_csv(raw / "labels.csv", index=False)
    df = ingest(raw, tmp_path / "out", params(label_source="csv"))
    assert list(df["split"]) == [wanted[pt] for _, _, pt in sorted(rows)]
    meta = json.loads((tmp_path / "out/manifest.json").read_text())
    assert meta["split"]["source"] == "labels.csv" and meta["patient_source"] == "labels.csv patient_id"
    assert meta["split"]["patients"] == {"train": 1, "val": 1, "test": 2}
    assert "ID-p0" not in (tmp_path / "out/manifest.csv").read_text()


def test_labels_csv_errors_name_the_problem(tmp_path):
    raw = tmp_path / "raw"
    rows = png_set(raw, patients=2)
    p = params(label_source="csv")

    def write(records, columns=None):
        pd.DataFrame(records, columns=columns).to_csv(raw / "labels.csv", index=False)

    # One patient in two splits: refused, naming the hashed patient, never the raw id.
    write(
        [
            {"path": r, "label": lab, "patient_id": "SECRET-1", "split": "train" if i else "test"}
            for i, (r, lab, _) in enumerate(rows)
        ]
    )
    with pytest.raises(common.StageError, match=r"patient [0-9a-f]{16} \(hashed\) is in splits") as err:
        ingest(raw, tmp_path / "out", p)
    assert "SECRET-1" not in str(err.value)
    write([{"path": r, "label": lab, "split": "training"} for r, lab, _ in rows])
    with pytest.raises(common.StageError, match=r"labels.csv line 2 .*split = 'training'; expected one of"):
        ingest(raw, tmp_path / "out", p)
    write([{"path": r, "label": lab} for r, lab, _ in rows] + [{"path": "normal/gone.png", "label": "normal"}])
    with pytest.raises(common.StageError, match=r"1 row\(s\) name no scan file .*line 6: 'normal/gone.png'"):
        ingest(raw, tmp_path / "out", p)
    write([{"file": r, "class": lab} for r, lab, _ in rows])
    with pytest.raises(common.StageError, match=r"missing column\(s\) \['path', 'label'\]; found \['file', 'class'\]"):
        ingest(raw, tmp_path / "out", p)
    # No manifest, half or whole (the facts read so far stay in the cache: valid, and not read again).
    assert not list((tmp_path / "out").glob("manifest*"))


def test_csv_without_row_gets_empty_label_and_warning(tmp_path):
    raw = tmp_path / "raw"
    rows = png_set(raw, patients=10)
    pd.DataFrame([{"path": r, "label": lab} for r, lab, _ in rows[1:]]).to_csv(raw / "labels.csv", index=False)
    df = ingest(raw, tmp_path / "out", params(label_source="csv", patient_pattern=r"^(?P<patient>p\d+)_"))
    assert df.set_index("path").loc[rows[0][0], "label"] == ""
    assert "have no row in labels.csv" in json.loads((tmp_path / "out/manifest.json").read_text())["warnings"][0]


def test_patient_pattern_groups_images(tmp_path):
    raw = tmp_path / "raw"
    png_set(raw, patients=10, per_patient=3)
    df = ingest(raw, tmp_path / "out", params(patient_pattern=r"^(?P<patient>p\d+)_"))
    assert df["patient"].nunique() == 10
    assert df.groupby("patient")["split"].nunique().max() == 1
    assert json.loads((tmp_path / "out/manifest.json").read_text())["patient_source"] == "data.patient_pattern"
    with pytest.raises(ValueError, match="no group named 'patient'"):
        ingest(raw, tmp_path / "out", params(patient_pattern=r"^(p\d+)_"))


def test_without_patient_ids_each_image_is_a_patient_loudly(tmp_path, caplog):
    raw = tmp_path / "raw"
    png_set(raw, patients=10, per_patient=2)
    df = ingest(raw, tmp_path / "out", params())
    meta = json.loads((tmp_path / "out/manifest.json").read_text())
    assert df["patient"].nunique() == 20
    assert meta["patient_source"] == NO_PATIENT
    assert "may leak across train/val/test" in meta["warnings"][0] and "patient_pattern" in meta["warnings"][0]
    assert "may leak across" in caplog.text


def test_unreadable_file_is_listed_with_its_reason(tmp_path):
    raw = tmp_path / "raw"
    png_set(raw, patients=10)
    (raw / "normal/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (raw / "lesion/notes.txt").write_text("not a scan")  # ignored, not an error
    df = ingest(raw, tmp_path / "out", params(patient_pattern=r"^(?P<patient>p\d+)_"))
    bad = df.set_index("path").loc["normal/broken.png"]
    assert bad["error"].startswith("not a readable PNG/JPEG") and str(tmp_path) not in bad["error"]
    assert bad["split"] == "" and pd.isna(bad["width"])
    assert "lesion/notes.txt" not in set(df["path"])
    meta = json.loads((tmp_path / "out/manifest.json").read_text())
    assert meta["n_images"] == 21 and meta["n_unreadable"] == 1
    assert sum(sum(c.values()) for c in meta["counts"].values()) == 20


def test_mixed_case_png_and_jpeg_extensions(tmp_path):
    raw = tmp_path / "raw"
    png_set(raw, patients=10)
    png(raw / "normal/q1_a.PNG")
    png(raw / "lesion/q2_a.JpG", mode="RGB", fmt="JPEG")
    png(raw / "lesion/q3_a.JPEG", fmt="JPEG")
    df = ingest(raw, tmp_path / "out", params()).set_index("path")
    assert df.loc["normal/q1_a.PNG", "modality"] == "PNG"
    assert df.loc["lesion/q2_a.JpG", "modality"] == "JPEG" and df.loc["lesion/q2_a.JpG", "channels"] == 3
    assert df.loc["lesion/q3_a.JPEG", "label"] == "lesion"
    assert (df["error"] == "").all()


def test_hidden_folders_and_files_are_skipped_and_said_so(tmp_path, caplog):
    raw = tmp_path / "raw"
    rows = png_set(raw, patients=10)
    png(raw / "__MACOSX/lesion/._q1_a.png")  # archive debris: not a scan of class "__MACOSX"
    png(raw / "lesion/.ipynb_checkpoints/q2_a.png")
    png(raw / "normal/.q3_a.png")
    with caplog.at_level("INFO", logger="medtune.ingest"):
        df = ingest(raw, tmp_path / "out", params())
    assert sorted(df["path"]) == sorted(r[0] for r in rows)
    assert "skipped 3 hidden" in caplog.text and "__MACOSX" in caplog.text


def test_main_uses_params_and_reports_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("data:\n  raw_dir: scans\n  patient_pattern: '^(?P<patient>p\\d+)_'\n")
    assert main([]) == 1
    assert "raw data folder scans not found" in capsys.readouterr().err
    png_set(tmp_path / "scans", patients=10)
    assert main([]) == 0
    assert len(pd.read_csv("data/manifest.csv")) == 20 and Path("data/manifest.json").is_file()
    assert np.all(pd.read_csv("data/manifest.csv")["label"].isin(CLASSES))


def test_test_fold_gives_patient_level_k_fold_cross_validation(tmp_path):
    raw = tmp_path / "raw"
    rows = png_set(raw, patients=20)
    patient_of = {path: patient for path, _, patient in rows}
    split = {"method": "stratified", "seed": 7, "val_fraction": 0.2, "test_fraction": 0.25}
    tested = []
    for fold in range(4):  # round(1 / 0.25) folds
        df = ingest(
            raw,
            tmp_path / f"f{fold}",
            params(patient_pattern=r"^(?P<patient>p\d+)_", split={**split, "test_fold": fold}),
        )
        tested.append({patient_of[p] for p in df.loc[df["split"] == "test", "path"]})
        assert json.loads((tmp_path / f"f{fold}/manifest.json").read_text())["split"]["test_fold"] == fold
    # Every patient is tested exactly once across the folds.
    assert sum(len(t) for t in tested) == 20 and set().union(*tested) == {f"p{p:02d}" for p in range(20)}
    with pytest.raises(ValueError, match=r"split.test_fold = 4 is invalid; expected a fold index in 0..3"):
        params(split={**split, "test_fold": 4})


@pytest.mark.parametrize("method", ["stratified", "stable"])
def test_byte_identical_images_never_cross_splits(tmp_path, method):
    raw = tmp_path / "raw"
    png_set(raw, patients=20)
    # The same picture filed again under other patients' names (as public folders do).
    for p in (3, 11, 17):
        (raw / f"{CLASSES[p % 2]}/p{p:02d}_9.png").write_bytes((raw / "lesion/p01_0.png").read_bytes())
    for seed in range(6):
        df = ingest(
            raw,
            tmp_path / f"{method}{seed}",
            params(
                patient_pattern=r"^(?P<patient>p\d+)_",
                split={"method": method, "seed": seed, "val_fraction": 0.2, "test_fraction": 0.25},
            ),
        )
        linked = df["path"].str.match(r".*/p(01|03|11|17)_")
        assert df.loc[linked, "split"].nunique() == 1, df.loc[linked, ["path", "split"]]
