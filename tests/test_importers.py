"""MedMNIST .npz importer: PNGs + labels.csv with the official split, both label shapes, clear errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components import common
from components.importers import import_npz, main
from components.ingest import ingest
from components.params import parse_params

SIZES = {"train": 6, "val": 3, "test": 4}


def make_npz(path, label_shape: str = "column", rgb: bool = False, drop: str | None = None) -> dict:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in SIZES.items():
        shape = (n, 8, 8, 3) if rgb else (n, 8, 8)
        arrays[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        labels = (np.arange(n) % 2).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None] if label_shape == "column" else labels
    if drop:
        del arrays[drop]
    np.savez(path, **arrays)
    return arrays


def test_column_labels_named_classes_and_ingest_keeps_the_split(tmp_path):
    arrays = make_npz(tmp_path / "x.npz", label_shape="column")
    table, names = import_npz(tmp_path / "x.npz", tmp_path / "raw", ["normal", "pneumonia"])
    assert names == ["normal", "pneumonia"]
    csv = pd.read_csv(tmp_path / "raw/labels.csv", dtype=str)
    assert list(csv.columns) == ["path", "label", "split"] and len(csv) == sum(SIZES.values())
    assert csv.groupby("split").size().to_dict() == SIZES
    row = csv[(csv["split"] == "val")].iloc[1]
    assert row["path"] == "pneumonia/val_00001.png" and row["label"] == "pneumonia"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "raw" / row["path"])), arrays["val_images"][1])
    # The pipeline's ingest reads it as it is, keeping the official split.
    df = ingest(tmp_path / "raw", tmp_path / "data",
                parse_params({"data": {"label_source": "csv", "classes": names}}))
    assert df.set_index("path")["split"].to_dict() == csv.set_index("path")["split"].to_dict()
    assert set(df["label"]) == set(names) and (df["error"] == "").all()


def test_flat_labels_rgb_and_default_class_names(tmp_path, capsys):
    arrays = make_npz(tmp_path / "x.npz", label_shape="flat", rgb=True)
    assert main([str(tmp_path / "x.npz"), "--out", str(tmp_path / "raw")]) == 0
    csv = pd.read_csv(tmp_path / "raw/labels.csv", dtype=str)
    assert set(csv["label"]) == {"0", "1"}
    img = np.asarray(Image.open(tmp_path / "raw/0/test_00000.png"))
    assert img.shape == (8, 8, 3) and np.array_equal(img, arrays["test_images"][0])
    out = capsys.readouterr().out
    assert "label_source: csv" in out and "classes: [0, 1]" in out and f"raw_dir: {tmp_path / 'raw'}" in out


def test_same_input_same_bytes(tmp_path):
    make_npz(tmp_path / "x.npz")
    import_npz(tmp_path / "x.npz", tmp_path / "a")
    import_npz(tmp_path / "x.npz", tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == sum(SIZES.values()) + 1
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_missing_key_names_the_file_and_the_keys_found(tmp_path, capsys):
    make_npz(tmp_path / "x.npz", drop="val_labels")
    with pytest.raises(common.StageError, match=r"x.npz: missing key\(s\) \['val_labels'\]; found \[.*'val_images'"):
        import_npz(tmp_path / "x.npz", tmp_path / "raw")
    assert main([str(tmp_path / "x.npz"), "--out", str(tmp_path / "raw")]) == 1
    assert "missing key(s) ['val_labels']" in capsys.readouterr().err
    assert not (tmp_path / "raw").exists()


def test_bad_shapes_and_class_names_are_refused(tmp_path):
    arrays = make_npz(tmp_path / "x.npz")
    with pytest.raises(ValueError, match=r"names 1 class\(es\) but .* label indices up to 1"):
        import_npz(tmp_path / "x.npz", tmp_path / "raw", ["only"])
    np.savez(tmp_path / "multi.npz", **{**arrays, "train_labels": np.zeros((6, 14), np.uint8)})
    with pytest.raises(common.StageError, match=r"train_labels has shape \(6, 14\); expected \(6,\) or \(6, 1\)"):
        import_npz(tmp_path / "multi.npz", tmp_path / "raw")
    np.savez(tmp_path / "float.npz", **{**arrays, "test_images": arrays["test_images"].astype(np.float32)})
    with pytest.raises(common.StageError, match=r"test_images is float32 \(4, 8, 8\); expected uint8"):
        import_npz(tmp_path / "float.npz", tmp_path / "raw")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(common.StageError, match="junk.npz: not a readable .npz file"):
        import_npz(tmp_path / "junk.npz", tmp_path / "raw")
