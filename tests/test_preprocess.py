"""components/data/preprocess.py end to end on a tiny hand-written manifest (PNG, JPEG and DICOM)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from components.common import StageError, hash_patient
from components.data.preprocess import load_meta, load_split, main, preprocess
from components.data.scans import prepare_image, recorded_preparation
from components.params import parse_params

SECRET_ID = "MRN-777-SECRET"
SIZE = 16


def dicom(path: Path, value: int) -> None:
    pixels = np.arange(100, dtype=np.uint16).reshape(10, 10) * value
    ds = Dataset()
    ds.PatientID, ds.PatientName, ds.Modality = SECRET_ID, "Roe^Richard", "CR"
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 10, 10, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def dataset(tmp_path):
    """raw/ with 6 readable scans and 1 unreadable one, and a manifest like ingest writes."""
    raw = tmp_path / "raw"
    for d in ("normal", "lesion"):
        (raw / d).mkdir(parents=True)
    files = {  # path: (label, split)
        "lesion/a.dcm": ("lesion", "train"),
        "lesion/b.png": ("lesion", "val"),
        "lesion/c.JPG": ("lesion", "test"),
        "normal/d.png": ("normal", "train"),
        "normal/e.png": ("normal", "train"),
        "normal/f.png": ("normal", "test"),
    }
    dicom(raw / "lesion/a.dcm", 3)
    rng = np.random.default_rng(0)
    for rel in files:
        if rel.endswith((".png", ".JPG")):
            Image.fromarray(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8)).save(
                raw / rel, format="JPEG" if rel.endswith(".JPG") else "PNG"
            )
    (raw / "normal/broken.png").write_bytes(b"not a png")
    salt = b"test-salt"
    rows = [
        {
            "path": rel,
            "sha256": sha(raw / rel),
            "label": lab,
            "patient": hash_patient(f"p{i}", salt),
            "width": 0,
            "height": 0,
            "channels": 1,
            "bit_depth": 8,
            "modality": "PNG",
            "split": split,
            "error": "",
        }
        for i, (rel, (lab, split)) in enumerate(files.items())
    ]
    rows.append(
        {
            "path": "normal/broken.png",
            "sha256": sha(raw / "normal/broken.png"),
            "label": "normal",
            "patient": "",
            "width": "",
            "height": "",
            "channels": "",
            "bit_depth": "",
            "modality": "",
            "split": "",
            "error": "not a readable PNG/JPEG",
        }
    )
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows).sort_values("path").to_csv(manifest, index=False)
    return raw, manifest, files


def params(size: int = SIZE, channels: int = 1, window="header"):
    return parse_params({"preprocess": {"image_size": size, "channels": channels, "window": window}})


def test_preprocess_end_to_end(dataset, tmp_path):
    raw, manifest, files = dataset
    before = {p: p.read_bytes() for p in raw.rglob("*") if p.is_file()}
    out = tmp_path / "prepared"
    meta = preprocess(manifest, raw, out, params(channels=3))

    assert meta["counts"] == {"train": 3, "val": 1, "test": 2}
    assert meta["classes"] == ["normal", "lesion"] and meta["image_size"] == SIZE and meta["channels"] == 3
    assert meta["input"] == "uint8 NCHW" and "bilinear" in meta["resize"] and meta["window"] == "header"
    assert load_meta(out) == meta
    # Every setting prepare_image takes is recorded, so predict (via the ONNX metadata) repeats it.
    assert recorded_preparation(meta) == {"image_size": SIZE, "channels": 3, "window": "header", "equalize": False}
    assert sorted(p.name for p in out.iterdir()) == ["index.csv", "meta.json", "test.npy", "train.npy", "val.npy"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left

    index = pd.read_csv(out / "index.csv")
    assert list(index.columns) == ["split", "row", "path", "sha256", "label", "label_index", "patient"]
    assert "normal/broken.png" not in set(index["path"])
    for split in ("train", "val", "test"):
        images, rows = load_split(out, split)
        assert isinstance(images, np.memmap) and images.dtype == np.uint8 and not images.flags.writeable
        assert images.shape == (len(rows), 3, SIZE, SIZE)
        assert rows["row"].tolist() == list(range(len(rows)))
        for i, r in rows.iterrows():
            assert files[r["path"]] == (r["label"], split)
            assert r["label_index"] == ["normal", "lesion"].index(r["label"])
            np.testing.assert_array_equal(images[i], prepare_image(raw / r["path"], SIZE, 3, "header"))

    # Raw data untouched; no raw patient identifier anywhere in the artefacts.
    assert {p: p.read_bytes() for p in raw.rglob("*") if p.is_file()} == before
    for p in out.iterdir():
        assert SECRET_ID.encode() not in p.read_bytes() and b"Roe" not in p.read_bytes()

    # Deterministic, and a rerun with other params replaces the folder as a whole.
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    preprocess(manifest, raw, out, params(channels=3))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    preprocess(manifest, raw, out, params(size=8, channels=1, window="minmax"))
    assert load_split(out, "train")[0].shape == (3, 1, 8, 8) and load_meta(out)["window"] == "minmax"
    assert load_meta(out)["equalize"] is False
    equalizing = parse_params({"preprocess": {"image_size": SIZE, "channels": 1, "equalize": True}})
    preprocess(manifest, raw, out, equalizing)
    images, rows = load_split(out, "train")
    assert load_meta(out)["equalize"] is True
    np.testing.assert_array_equal(images[0], prepare_image(raw / rows["path"][0], SIZE, 1, "header", equalize=True))
    # The pixel cache sits beside the output folder and holds only the last settings' set.
    [pixel_set] = (tmp_path / "cache/pixels").iterdir()
    assert load_meta(out)["equalize"] is True and '"equalize":true' in (
        pixel_set / "settings.json"
    ).read_text().replace(" ", "")


def test_changed_raw_file_is_refused(dataset, tmp_path):
    raw, manifest, _ = dataset
    out = tmp_path / "prepared"
    preprocess(manifest, raw, out, params())
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    Image.fromarray(np.zeros((12, 20), np.uint8)).save(raw / "normal/f.png")
    with pytest.raises(StageError, match=r"normal/f\.png.*sha256"):
        preprocess(manifest, raw, out, params())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old  # the previous cache survives
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_empty_split_and_unknown_label(dataset, tmp_path):
    raw, manifest, _ = dataset
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    df.loc[df["split"] == "val", "split"] = "train"
    df.to_csv(tmp_path / "noval.csv", index=False)
    with pytest.raises(StageError, match="'val' split"):
        preprocess(tmp_path / "noval.csv", raw, tmp_path / "prepared", params())
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    df.loc[0, "label"] = "tumour"
    df.to_csv(tmp_path / "badlabel.csv", index=False)
    with pytest.raises(StageError, match="'tumour'"):
        preprocess(tmp_path / "badlabel.csv", raw, tmp_path / "prepared", params())
    with pytest.raises(StageError, match="not found"):
        load_split(tmp_path / "prepared", "train")


def test_main_refuses_failed_validation_and_runs_otherwise(dataset, tmp_path, capsys):
    raw, manifest, _ = dataset
    params_yaml = tmp_path / "params.yaml"
    params_yaml.write_text(yaml.safe_dump({"data": {"raw_dir": str(raw)}, "preprocess": {"image_size": SIZE}}))
    report = tmp_path / "validation.json"
    report.write_text(json.dumps({"success": False, "failures": [{"name": "label_in_classes", "critical": True}]}))
    out = tmp_path / "prepared"
    argv = ["--params", str(params_yaml), "--manifest", str(manifest), "--validation", str(report), "--out", str(out)]
    assert main(argv) == 1
    assert "label_in_classes" in capsys.readouterr().err and not out.exists()
    report.write_text(json.dumps({"success": True, "failures": []}))
    assert main(argv) == 0
    assert load_split(out, "test")[0].shape == (2, 1, SIZE, SIZE)
