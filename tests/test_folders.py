"""The one folder rule (components.data.folders) as ingest, validate, import-folders, the inbox and predict
apply it: links out of the folder are never read, labels.csv paths stay inside, nothing is skipped
without a word, and a file is a scan by its bytes when its name does not say."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from components import common
from components.data import folders, ingest, scans
from components.data import validate as V
from components.data.demo_data import generate
from components.data.folder_import import import_folders
from components.data.manifest import read_manifest
from components.params import parse_params
from components.retrain import inbox

CLASSES = ["normal", "lesion"]
PARAMS = parse_params(
    {
        "split": {"seed": 1, "val_fraction": 0.25, "test_fraction": 0.3},
        "validate": {"min_size": 16, "min_images_per_class_split": 1},
    }
)


def png(path: Path, value: int, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (24, 24), value).save(path, format=fmt)


@pytest.fixture()
def secret(tmp_path) -> Path:
    """A scan outside every folder read: its bytes must never reach a manifest, a copy or a CSV."""
    path = tmp_path / "elsewhere" / "secret.png"
    png(path, 201)
    return path


def test_list_folder_names_every_entry_it_does_not_take(tmp_path, secret):
    root = tmp_path / "raw"
    png(root / "a" / "x.png", 1)
    png(root / "a" / "no_extension", 2, fmt="JPEG")  # a JPEG saved without a name ending
    (root / "a" / "notes.txt").write_text("n")
    (root / "a" / "inside.png").symlink_to(root / "a" / "x.png")
    (root / "a" / "outside.png").symlink_to(secret)
    (root / "a" / "climb.png").symlink_to(Path("../../elsewhere/secret.png"))
    (root / "a" / "broken.png").symlink_to(root / "nowhere.png")
    (root / "a" / "dirlink").symlink_to(secret.parent, target_is_directory=True)
    (root / ".git").mkdir()
    (root / ".git" / "x.png").write_bytes(b"")
    (root / "labels.csv").write_text("path,label\n")
    listing = folders.list_folder(root)
    assert listing.scans == ["a/inside.png", "a/no_extension", "a/x.png"]
    assert {s.path: s.reason for s in listing.skipped} == {
        ".git": folders.HIDDEN,
        "a/broken.png": folders.LINK_BROKEN,
        "a/climb.png": folders.LINK_OUTSIDE,
        "a/dirlink": folders.LINK_OUTSIDE,
        "a/notes.txt": folders.NOT_A_SCAN,
        "a/outside.png": folders.LINK_OUTSIDE,
    }


def test_the_listing_answers_as_scans_is_candidate(tmp_path, secret):
    root = tmp_path / "raw"
    png(root / "x.PNG", 1)
    png(root / "y.dcm", 2)  # named like a scan: listed as one (probe later finds it unreadable)
    png(root / "no_extension", 3, fmt="JPEG")
    (root / "labels.csv").write_text("path,label\n")
    (root / "notes.txt").write_text("n")
    (root / "fifo.png").mkdir()  # a folder named like a scan
    os.mkfifo(root / "pipe.png")
    (root / "link.jpg").symlink_to(root / "x.PNG")
    with os.scandir(root) as entries:
        answers = {e.name: folders._is_scan(e) for e in entries}
    assert answers == {e.name: scans.is_candidate(root / e.name) for e in os.scandir(root)}
    assert answers["x.PNG"] and answers["no_extension"] and not answers["pipe.png"] and not answers["fifo.png"]


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x.png", "a/../../x.png", "C:\\scans\\x.png", ""])
def test_labels_paths_must_stay_inside(bad):
    with pytest.raises(ValueError, match="labels.csv line 7: path"):
        folders.check_relative(bad, "labels.csv line 7")
    assert folders.check_relative("./a/./b/../x.png", "w") == "a/x.png"


def test_ingest_never_reads_a_link_out_of_raw_and_validate_fails_naming_it(tmp_path, secret):
    raw = tmp_path / "raw"
    generate(raw, patients=8, slices=2, size=32, seed=0, classes=CLASSES)
    (raw / "lesion" / "zz_link.dcm").symlink_to(secret)
    (raw / "lesion" / "notes.bmp").write_bytes(b"BM not a scan")
    ingest.ingest(raw, tmp_path / "data", PARAMS)
    manifest = read_manifest(tmp_path / "data/manifest.csv")
    assert "lesion/zz_link.dcm" not in set(manifest["path"])
    assert common.sha256_file(secret) not in set(manifest["sha256"])
    meta = json.loads((tmp_path / "data/manifest.json").read_text())
    assert {"path": "lesion/zz_link.dcm", "reason": folders.LINK_OUTSIDE} in meta["skipped"]
    assert {"path": "lesion/notes.bmp", "reason": folders.NOT_A_SCAN} in meta["skipped"]
    reports = tmp_path / "reports"
    with pytest.raises(common.StageError, match="links_stay_inside.*lesion/zz_link.dcm"):
        V.validate(
            tmp_path / "data/manifest.csv",
            tmp_path / "data/manifest.json",
            reports / "v.json",
            reports / "v.md",
            PARAMS,
        )
    md = (reports / "v.md").read_text()
    assert "## Skipped (2 entries" in md and "`lesion/notes.bmp`: not a scan" in md


def test_a_jpeg_without_extension_is_ingested_not_dropped(tmp_path):
    raw = tmp_path / "raw"
    for i in range(12):
        png(raw / CLASSES[i % 2] / f"p{i:02d}.png", 10 * i)
    png(raw / "lesion" / "p99", 250, fmt="JPEG")
    ingest.ingest(raw, tmp_path / "data", PARAMS)
    row = read_manifest(tmp_path / "data/manifest.csv").set_index("path").loc["lesion/p99"]
    assert row["modality"] == "JPEG" and row["error"] == ""


@pytest.mark.parametrize("bad", ["/etc/hostname", "../outside.png", "normal/../../outside.png"])
def test_ingest_refuses_a_labels_row_leaving_the_folder(tmp_path, bad):
    raw = tmp_path / "raw"
    png(raw / "normal" / "a.png", 1)
    png(tmp_path / "outside.png", 2)
    (raw / "labels.csv").write_text(f"path,label\nnormal/a.png,normal\n{bad},lesion\n")
    with pytest.raises(common.StageError, match=r"labels.csv line 3: path .* (absolute|climbs out)"):
        ingest.ingest(raw, tmp_path / "data", parse_params({"data": {"label_source": "csv"}}))


def test_import_folders_skips_links_out_of_the_source_with_a_warning(tmp_path, secret, caplog):
    src = tmp_path / "src"
    for label in CLASSES:
        for i in range(2):
            png(src / label / f"{i}.png", 40 * i + len(label))
    (src / "lesion" / "link_out.png").symlink_to(secret)
    (src / "lesion" / "link_in.png").symlink_to(src / "normal" / "0.png")  # inside the tree: copied
    with caplog.at_level(logging.WARNING):
        table, _ = import_folders(src, tmp_path / "out")
    assert "lesion/link_out.png" not in set(table["path"]) and "lesion/link_in.png" in set(table["path"])
    assert not (tmp_path / "out" / "lesion" / "link_out.png").exists()
    assert "link_out.png (symbolic link to a target outside the folder" in caplog.text


@pytest.fixture()
def raw_manifest(tmp_path):
    raw = tmp_path / "raw"
    generate(raw, patients=8, slices=2, size=32, seed=0, classes=CLASSES)
    ingest.ingest(raw, tmp_path / "data", PARAMS)
    return read_manifest(tmp_path / "data/manifest.csv")


def problems_of(batch: Path, manifest: pd.DataFrame) -> list[str]:
    rows, problems = inbox.read_batch(batch, PARAMS)
    return problems + inbox.check_batch(batch, rows, manifest, PARAMS)


def test_a_batch_link_out_of_the_batch_is_a_quarantine_reason(tmp_path, secret, raw_manifest):
    source = tmp_path / "drop"
    png(source / "lesion" / "new1.png", 77)
    (source / "lesion" / "new2.png").symlink_to(secret)
    batch = inbox.add_to_inbox(source, tmp_path / "inbox")
    assert (batch / "lesion" / "new2.png").is_symlink()  # copied as a link, never as the secret's bytes
    problems = problems_of(batch, raw_manifest)
    assert any("new2.png: symbolic link to a target outside the folder" in p for p in problems), problems


@pytest.mark.parametrize("bad", ["/etc/hostname", "../../raw/normal/case000_00.dcm", "lesion/../../x.png"])
def test_a_batch_labels_row_leaving_the_batch_quarantines_it_with_its_line(tmp_path, raw_manifest, bad):
    batch = tmp_path / "inbox" / "b1"
    png(batch / "lesion" / "new1.png", 77)
    (batch / "labels.csv").write_text(f"path,label\nlesion/new1.png,lesion\n{bad},lesion\n")
    problems = problems_of(batch, raw_manifest)
    assert "labels.csv line 3: path" in problems[0], problems


def test_a_batch_labels_row_naming_a_hidden_or_missing_file_is_named(tmp_path, raw_manifest):
    batch = tmp_path / "inbox" / "b1"
    png(batch / "lesion" / "new1.png", 77)
    png(batch / ".hidden" / "h.png", 78)
    (batch / "labels.csv").write_text("path,label\nlesion/new1.png,lesion\n.hidden/h.png,lesion\nnope.png,normal\n")
    problems = problems_of(batch, raw_manifest)
    assert any("line 3: path '.hidden/h.png' is not a scan file" in p for p in problems)
    assert any("line 4: path 'nope.png' is not a scan file" in p for p in problems)


def test_predict_gives_a_link_out_of_the_folder_an_error_row_not_a_prediction(tmp_path, secret):
    from components.release.predict import expand_paths

    folder = tmp_path / "scans"
    png(folder / "a.png", 5)
    (folder / "b.png").symlink_to(secret)
    files, refused = expand_paths([folder])
    assert [f.name for f in files] == ["a.png", "b.png"]
    assert refused == {folder / "b.png": f"{folder / 'b.png'}: {folders.LINK_OUTSIDE}"}


def test_no_entry_is_a_hidden_link_into_the_listing(tmp_path, secret):
    """A hidden link is hidden first: not opened, not followed, listed as hidden."""
    root = tmp_path / "raw"
    png(root / "a.png", 1)
    os.symlink(secret, root / ".sneaky.png")
    assert folders.list_folder(root).with_reason(folders.HIDDEN) == [".sneaky.png"]


def test_a_csv_batch_with_a_patient_in_two_splits_is_refused(tmp_path):
    params = parse_params({"data": {"label_source": "csv"}, "validate": {"min_size": 16}})
    batch = tmp_path / "inbox" / "b1"
    png(batch / "a.png", 1)
    png(batch / "b.png", 2)
    (batch / "labels.csv").write_text("path,label,patient_id,split\na.png,lesion,P7,train\nb.png,lesion,P7,test\n")
    rows, problems = inbox.read_batch(batch, params)
    problems += inbox.check_batch(batch, rows, pd.DataFrame(columns=list(rows.columns)), params)
    assert any("is in splits ['test', 'train'] within the batch" in p and "a.png" in p for p in problems), problems


def test_links_out_are_refused_before_dvc_add_would_copy_them_in(tmp_path, secret):
    """`dvc add` replaces a link with a copy of its target: the flow checks before it versions raw."""
    raw = tmp_path / "raw"
    png(raw / "a" / "x.png", 1)
    (raw / "a" / "y.png").symlink_to(raw / "a" / "x.png")
    folders.refuse_links_out(raw)  # a link inside is fine
    (raw / "a" / "z.png").symlink_to(secret)
    with pytest.raises(common.StageError, match=r"raw: 1 symbolic link\(s\) to outside the folder \(\['a/z.png'\]\)"):
        folders.refuse_links_out(raw)
