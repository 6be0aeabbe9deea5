"""Importers: MedMNIST .npz (PNGs + labels.csv with the official split, both label shapes) and folder
trees (folder per class, optionally under split folders; bytes copied, source untouched), clear errors."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components import cli, common
from components.data.folder_import import import_folders, main_folders
from components.data.ingest import ingest
from components.data.npz_import import import_npz, main
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
    df = ingest(tmp_path / "raw", tmp_path / "data", parse_params({"data": {"label_source": "csv", "classes": names}}))
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


def test_npz_import_refuses_an_earlier_import(tmp_path):
    make_npz(tmp_path / "x.npz")
    import_npz(tmp_path / "x.npz", tmp_path / "a")
    before = snapshot(tmp_path / "a")
    with pytest.raises(common.StageError, match=re.escape(str(tmp_path / "a" / "labels.csv")) + " already exists"):
        import_npz(tmp_path / "x.npz", tmp_path / "a", classes=["x", "y"])
    assert snapshot(tmp_path / "a") == before


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


# --------------------------------------------------------------------------- import-folders


def make_scan(path, value: int, fmt: str = "PNG") -> None:
    """A tiny image whose bytes differ with `value` (so no two test scans are duplicates)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value % 256, np.uint8)).save(path, format=fmt)


def snapshot(root) -> dict[str, str]:
    """Digest of every file and the name of every folder under root: equal snapshots = untouched tree."""
    return {
        p.relative_to(root).as_posix(): common.sha256_file(p) if p.is_file() else "dir" for p in sorted(root.rglob("*"))
    }


def make_class_tree(src, n: int = 6) -> None:
    """SRC/<class>/... with scans at two depths, a JPEG, hidden entries and non-scan files."""
    for i in range(n):
        make_scan(src / "normal" / (f"sub/n{i}.png" if i % 2 else f"n{i}.png"), i)
        make_scan(src / "pneumonia" / f"p{i}.jpg", 100 + i, "JPEG")
    make_scan(src / "normal/.hidden.png", 200)
    make_scan(src / "normal/_thumbs/t.png", 201)
    make_scan(src / "__MACOSX/normal/x.png", 202)  # a hidden top folder is no class
    (src / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (src / "README.md").write_text("downloaded from somewhere\n")
    (src / "pneumonia/notes.txt").write_text("not a scan\n")


def test_folder_per_class_copies_bytes_skips_hidden_and_counts_non_scans(tmp_path, caplog):
    src, out = tmp_path / "src", tmp_path / "raw"
    make_class_tree(src)
    before = snapshot(src)
    table, names = import_folders(src, out)
    assert names == ["normal", "pneumonia"]
    assert snapshot(src) == before
    csv = pd.read_csv(out / "labels.csv", dtype=str)
    assert list(csv.columns) == ["path", "label"] and len(csv) == 12 and csv.equals(table)
    assert "normal/sub/n1.png" in set(csv["path"]) and (csv["label"] == csv["path"].str.split("/").str[0]).all()
    # OUT holds exactly the visible scans of SRC, under the same relative paths, byte for byte.
    scans_in_src = {k: v for k, v in before.items() if k.startswith(("normal/n", "normal/sub/n", "pneumonia/p"))}
    copied = {k: v for k, v in snapshot(out).items() if v != "dir" and k != "labels.csv"}
    assert copied == scans_in_src
    assert "skipped 2 file(s) that are not scans" in caplog.text
    assert "README.md" in caplog.text and "pneumonia/notes.txt" in caplog.text
    # No split column: ingest makes its own patient-level split, labels from the CSV.
    df = ingest(out, tmp_path / "data", parse_params({"data": {"label_source": "csv", "classes": names}}))
    assert set(df["split"]) == {"train", "val", "test"} and (df["error"] == "").all()
    assert df.set_index("path")["label"].to_dict() == csv.set_index("path")["label"].to_dict()


def test_split_folders_any_spelling_keep_the_official_split(tmp_path, capsys, caplog):
    src, out = tmp_path / "src", tmp_path / "raw"
    n = 0
    for split, folder in {"train": "Training", "val": "Validation", "test": "testing"}.items():
        for c in ("a", "b") if split != "test" else ("a",):  # no b in test: a warning, not an error
            for i in range(2):
                make_scan(src / folder / c / f"img{i}.png", n := n + 1)  # the same names in every split
    (src / "Training/b/labels.txt").write_text("x\n")
    before = snapshot(src)
    assert cli.main(["import-folders", str(src), "--out", str(out)]) == 0
    assert snapshot(src) == before
    csv = pd.read_csv(out / "labels.csv", dtype=str)
    assert list(csv.columns) == ["path", "label", "split"] and len(csv) == 10
    assert csv.groupby("split").size().to_dict() == {"train": 4, "val": 4, "test": 2}
    for r in csv.itertuples():
        label, split, name = r.path.split("/")
        folder = {"train": "Training", "val": "Validation", "test": "testing"}[split]
        assert (label, split) == (r.label, r.split)
        assert (out / r.path).read_bytes() == (src / folder / label / name).read_bytes()
    printed = capsys.readouterr().out
    assert "test/a: 2, train/a: 2, train/b: 2, val/a: 2, val/b: 2" in printed
    assert "label_source: csv" in printed and "classes: [a, b]" in printed
    assert f"{src}: split 'test' has no folder for class(es) ['b']" in caplog.text
    assert "skipped 1 file(s)" in caplog.text and "Training/b/labels.txt" in caplog.text
    df = ingest(out, tmp_path / "data", parse_params({"data": {"label_source": "csv", "classes": ["a", "b"]}}))
    assert df.set_index("path")["split"].to_dict() == csv.set_index("path")["split"].to_dict()


def test_split_folders_inside_class_folders_keep_the_official_split(tmp_path, caplog):
    src, out = tmp_path / "src", tmp_path / "raw"
    n = 0
    for c in ("a", "b"):
        for folder in ("train", "VAL", "test") if c == "a" else ("train", "VAL"):  # b has no test: a warning
            for i in range(2):
                make_scan(src / c / folder / f"p{i}/img.png", n := n + 1)  # patient folders below the split
    (src / "a/notes.txt").write_text("x\n")
    before = snapshot(src)
    table, names = import_folders(src, out)
    assert snapshot(src) == before and names == ["a", "b"]
    csv = pd.read_csv(out / "labels.csv", dtype=str)
    assert list(csv.columns) == ["path", "label", "split"] and csv.equals(table)
    assert csv.groupby(["split", "label"]).size().to_dict() == {
        ("test", "a"): 2,
        ("train", "a"): 2,
        ("train", "b"): 2,
        ("val", "a"): 2,
        ("val", "b"): 2,
    }
    folder = {"train": "train", "val": "VAL", "test": "test"}
    for r in csv.itertuples():
        assert r.path == f"{r.label}/{r.split}/{r.path.split('/', 2)[2]}"
        assert (out / r.path).read_bytes() == (src / r.label / folder[r.split] / r.path.split("/", 2)[2]).read_bytes()
    assert f"{src}: split 'test' has no folder for class(es) ['b']" in caplog.text
    assert "skipped 1 file(s)" in caplog.text and "a/notes.txt" in caplog.text
    df = ingest(out, tmp_path / "data", parse_params({"data": {"label_source": "csv", "classes": names}}))
    assert df.set_index("path")["split"].to_dict() == csv.set_index("path")["split"].to_dict()


def _tree(src, files: list[str]) -> None:
    for i, rel in enumerate(files):
        if rel.endswith("/"):
            (src / rel).mkdir(parents=True, exist_ok=True)
        elif rel.endswith(".png"):
            make_scan(src / rel, i)
        else:
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_text("x\n")


# case: (files made under tmp_path/src, SRC and the path the message names (both relative to tmp_path), the
# rest of the message after that path)
ERRORS = {
    "src missing": ([], "nope", "nope", " not found; expected a folder of class folders"),
    "src is a file": (["f.png"], "src/f.png", "src/f.png", " is not a folder; expected a folder of class folders"),
    "no class folders": ([".git/x.png", "_junk/", "notes.txt"], "src", "src", ": no class folders"),
    "class without scans": (
        ["a/x.png", "b/notes.txt", "b/deep/"],
        "src",
        "src/b",
        r": class folder holds no scan file \(1 other file\(s\)\)",
    ),
    "loose scan in src": (
        ["a/x.png", "y.png"],
        "src",
        "src",
        r": 1 scan file\(s\) directly in the source folder \(\['y.png'\]\)",
    ),
    "loose scan in split": (
        ["train/a/x.png", "train/y.png"],
        "src",
        "src/train",
        r": 1 scan file\(s\) directly in split folder 'train' \(\['y.png'\]\)",
    ),
    "split and class mixed": (
        ["train/a/x.png", "cats/x.png"],
        "src",
        "src",
        r": folders \['train'\] are split names but \['cats'\] are not; expected",
    ),
    "split spelt twice": (
        ["train/a/x.png", "Training/a/x.png"],
        "src",
        "src",
        r": folders 'Training' and 'train' both mean split 'train'",
    ),
    "split without classes": (["train/", "test/a/x.png"], "src", "src/train", ": no class folders"),
    "splits in some class folders": (
        ["a/train/x.png", "b/x.png"],
        "src",
        "src",
        r": class folders \['a'\] hold split folders but \['b'\] do not",
    ),
    "split and patient folders in a class": (
        ["a/train/x.png", "a/p1/x.png"],
        "src",
        "src/a",
        r": folders \['train'\] are split names but \['p1'\] are not",
    ),
    "loose scan beside split folders": (
        ["a/train/x.png", "a/y.png"],
        "src",
        "src/a",
        r": 1 scan file\(s\) directly in class folder 'a' \(\['y.png'\]\); "
        "expected scans only inside its split folders",
    ),
    "classes differ in case": (
        ["train/Normal/x.png", "test/normal/x.png"],
        "src",
        "src",
        r": class folders \['Normal', 'normal'\] differ only in case",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_folder_errors_name_the_path(tmp_path, case):
    files, src, named, message = ERRORS[case]
    _tree(tmp_path / "src", files)
    with pytest.raises(common.StageError, match=re.escape(str(tmp_path / named)) + message):
        import_folders(tmp_path / src, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()  # every check runs before the first copy


def test_folder_import_refuses_existing_labels_and_overlap(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "raw"
    _tree(src, ["a/x.png"])
    (out / "a").mkdir(parents=True)
    (out / "labels.csv").write_text("path,label\n")
    with pytest.raises(common.StageError, match=re.escape(str(out / "labels.csv")) + " already exists; refusing"):
        import_folders(src, out)
    assert (out / "labels.csv").read_text() == "path,label\n" and not (out / "a/x.png").exists()
    before = snapshot(src)
    with pytest.raises(common.StageError, match=re.escape(f"--out {src / 'raw'} and source {src} overlap")):
        import_folders(src, src / "raw")
    assert snapshot(src) == before
    assert main_folders([str(src), "--out", str(out)]) == 1
    assert "already exists; refusing to overwrite" in capsys.readouterr().err
