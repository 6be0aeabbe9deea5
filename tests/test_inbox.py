"""New batches: checks on real files (synthetic DICOM/PNG), quarantine, append to raw, the inbox drop."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components import common
from components.data.demo_data import generate
from components.data.ingest import ingest
from components.data.manifest import read_manifest
from components.params import parse_params
from components.retrain import inbox, raw_append

CLASSES = ["normal", "lesion"]
PARAMS = parse_params({"split": {"seed": 1, "val_fraction": 0.25, "test_fraction": 0.3}, "validate": {"min_size": 16}})


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def raw(tmp_path):
    """Raw data of 8 demo patients and its real manifest (components.data.ingest)."""
    raw = tmp_path / "raw"
    generate(raw, patients=8, slices=2, size=32, seed=0, classes=CLASSES)
    ingest(raw, tmp_path / "data", PARAMS)
    return raw, read_manifest(tmp_path / "data/manifest.csv")


def check(batch: Path, manifest: pd.DataFrame, params=PARAMS) -> tuple[pd.DataFrame, list[str]]:
    rows, problems = inbox.read_batch(batch, params)
    return rows, problems + inbox.check_batch(
        batch, rows, manifest, params, raw_append.appended_paths(batch.name, rows, params) if len(rows) else []
    )


def test_good_batch_is_appended_without_touching_existing_raw_files(raw, tmp_path):
    raw_dir, manifest = raw
    batch = tmp_path / "inbox/2024-06"
    generate(batch, patients=4, slices=2, size=32, seed=0, classes=CLASSES, patient_offset=500)
    rows, problems = check(batch, manifest)
    assert problems == []
    assert len(rows) == 8 and set(rows["label"]) <= set(CLASSES) and (rows["patient"] != "").all()
    assert not rows["patient"].isin(manifest["patient"]).any()
    before = tree(raw_dir)

    dests = raw_append.append_to_raw(batch, rows, raw_dir, PARAMS)
    after = tree(raw_dir)
    assert all(after[k] == v for k, v in before.items())
    assert sorted(set(after) - set(before)) == sorted(dests)
    assert all(d.split("/")[1] == "2024-06" and d.split("/")[0] in CLASSES for d in dests)
    assert raw_append.append_to_raw(batch, rows, raw_dir, PARAMS) == dests and tree(raw_dir) == after  # idempotent

    # The real ingest sees the new scans with the batch's labels and patients.
    m = ingest(raw_dir, tmp_path / "data2", PARAMS)
    new = m[m["path"].isin(dests)].set_index("path")
    for r in rows.itertuples():
        d = raw_append.raw_destination("2024-06", r.path, r.label, PARAMS)
        assert new.loc[d, "label"] == r.label and new.loc[d, "patient"] == r.patient


def test_bad_batch_lists_every_problem_by_file(raw, tmp_path):
    raw_dir, manifest = raw
    batch = tmp_path / "inbox/bad"
    generate(batch, patients=2, slices=1, size=32, seed=7, classes=CLASSES)  # patients 1-2 again, new pixels
    existing = sorted((raw_dir / "lesion").glob("*.dcm"))[0]
    shutil.copy(existing, batch / "lesion" / "dup.dcm")
    (batch / "tumour").mkdir()
    generate(tmp_path / "other", patients=1, slices=1, size=32, seed=3, classes=CLASSES, patient_offset=900)
    shutil.copy(next((tmp_path / "other").rglob("*.dcm")), batch / "tumour" / "t.dcm")
    (batch / "normal" / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(batch / "normal" / "tiny.png")
    (batch / "normal" / "notes.txt").write_text("not a scan")

    _, problems = check(batch, manifest)
    text = "\n".join(problems)
    assert "dup.dcm: duplicates raw scan" in text
    assert "t.dcm: label 'tumour' is unknown" in text
    assert "broken.dcm: unreadable" in text
    assert "tiny.png: size 8x8 is outside" in text
    assert "notes.txt: not a scan" in text
    assert "is already in the raw data" in text  # DEMO-001/002 are patients of the raw data
    assert "DEMO-0" not in text  # patients are named by hash only


def test_quarantine_moves_the_batch_unchanged_with_a_report(tmp_path):
    batch = tmp_path / "inbox/b1"
    generate(batch, patients=1, slices=1, size=32, seed=0, classes=CLASSES)
    before = tree(batch)
    dest = inbox.quarantine(batch, tmp_path / "quarantine", ["b1/x.dcm: label 'y' is unknown"], {"flow_run_id": "r"})
    assert not batch.exists() and tree(dest / "batch") == before
    report = json.loads((dest / "report.json").read_text())
    assert report["problems"] == ["b1/x.dcm: label 'y' is unknown"] and report["flow_run_id"] == "r"
    assert "label 'y' is unknown" in (dest / "report.md").read_text()


def test_inbox_drop_is_atomic_and_named(tmp_path):
    src = tmp_path / "src/june"
    generate(src, patients=1, slices=1, size=32, seed=0, classes=CLASSES)
    before = tree(src)
    box = tmp_path / "inbox"
    (box / ".incoming-x").mkdir(parents=True)  # a drop in progress
    (box / "_drafts").mkdir()
    assert inbox.find_batches(box) == []
    dest = inbox.add_to_inbox(src, box)
    assert dest == box / "june" and tree(dest) == before and tree(src) == before
    assert inbox.find_batches(box) == [dest]
    assert [p.name for p in box.iterdir() if p.name.startswith(".incoming-june")] == []
    with pytest.raises(common.StageError, match="already exists"):
        inbox.add_to_inbox(src, box)
    with pytest.raises(common.StageError, match="batch name '.x' is invalid"):
        inbox.add_to_inbox(src, box, ".x")
    with pytest.raises(common.StageError, match="is not a folder"):
        inbox.add_to_inbox(tmp_path / "missing", box)


def png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32), value, np.uint8)).save(path)


def test_csv_batches_follow_the_split_rule_and_extend_labels_csv(tmp_path):
    params = parse_params({"data": {"label_source": "csv"}})
    raw = tmp_path / "raw"
    lines = ["path,label,patient_id,split"]
    for i, (pid, split) in enumerate([("P1", "train"), ("P2", "val"), ("P3", "test"), ("P4", "train")]):
        for j, label in enumerate(CLASSES):
            png(raw / f"img/{pid}_{j}.png", 10 + 60 * i + 30 * j)
            lines.append(f"img/{pid}_{j}.png,{label},{pid},{split}")
    (raw / "labels.csv").write_text("\n".join(lines) + "\n")
    manifest = ingest(raw, tmp_path / "data", params)

    batch = tmp_path / "inbox/csv1"
    png(batch / "a.png", 250)
    png(batch / "b.png", 251)
    png(batch / "c.png", 252)
    (batch / "labels.csv").write_text(
        "path,label,patient_id,split\na.png,lesion,P1,train\nb.png,normal,P2,test\nc.png,normal,P9,test\n"
    )
    rows, problems = check(batch, manifest, params)
    assert len(problems) == 1 and "b.png: patient" in problems[0] and "split val" in problems[0], problems

    (batch / "labels.csv").write_text(
        "path,label,patient_id,split\na.png,lesion,P1,train\nb.png,normal,P2,val\nc.png,normal,P9,test\n"
    )
    rows, problems = check(batch, manifest, params)
    assert problems == []
    old = (raw / "labels.csv").read_text()
    dests = raw_append.append_to_raw(batch, rows, raw, params)
    assert dests == ["csv1/a.png", "csv1/b.png", "csv1/c.png"]
    text = (raw / "labels.csv").read_text()
    assert text.startswith(old) and text.endswith("csv1/c.png,normal,P9,test\n")
    raw_append.append_to_raw(batch, rows, raw, params)
    assert (raw / "labels.csv").read_text() == text  # no duplicate rows on a resumed run
    m = ingest(raw, tmp_path / "data2", params).set_index("path")
    assert m.loc["csv1/b.png", "split"] == "val" and m.loc["csv1/c.png", "split"] == "test"


def test_batch_labels_csv_is_read_as_ingest_reads_labels_csv(tmp_path):
    params = parse_params({"data": {"label_source": "csv", "patient_salt": "s"}})
    batch = tmp_path / "inbox/csv3"
    png(batch / "a.png", 240)
    png(batch / "sub/c.png", 241)
    (batch / "labels.csv").write_text("path , label,patient_id\n a.png , lesion , P7 \nsub\\c.png,normal,P8\n")
    rows, problems = inbox.read_batch(batch, params)
    assert problems == []
    got = rows.set_index("path")
    assert got["label"].to_dict() == {"a.png": "lesion", "sub/c.png": "normal"}
    assert got.loc["a.png", "patient"] == common.hash_patient("P7", b"s")  # stripped, as ingest does
    (batch / "labels.csv").write_text("path,label\na.png,lesion\n./a.png,normal\n")
    rows, problems = inbox.read_batch(batch, params)
    assert rows.empty and problems == [
        f"{batch / 'labels.csv'}: path 'a.png' appears on lines [2, 3]; expected one row per file."
    ]


def test_append_refuses_a_reused_batch_name(raw, tmp_path):
    raw_dir, manifest = raw
    batch = tmp_path / "inbox/again"
    generate(batch, patients=1, slices=1, size=32, seed=0, classes=CLASSES, patient_offset=700)
    rows, _ = check(batch, manifest)
    dests = raw_append.append_to_raw(batch, rows, raw_dir, PARAMS)
    (raw_dir / dests[0]).write_bytes(b"other")  # a different file already sits at that path
    with pytest.raises(common.StageError, match="already exists with other content"):
        raw_append.append_to_raw(batch, rows, raw_dir, PARAMS)


def test_remove_from_raw_undoes_only_the_appended_files(raw, tmp_path):
    raw_dir, manifest = raw
    before = tree(raw_dir)
    batch = tmp_path / "inbox/2024-07"
    generate(batch, patients=2, slices=1, size=32, seed=0, classes=CLASSES, patient_offset=600)
    rows, problems = check(batch, manifest)
    assert problems == []
    dests = raw_append.append_to_raw(batch, rows, raw_dir, PARAMS)
    assert raw_append.remove_from_raw(raw_dir, dests, PARAMS) == dests
    assert tree(raw_dir) == before  # every original byte-identical, nothing of the batch left
    assert not any(p.name == "2024-07" for p in raw_dir.rglob("*"))  # its empty folders are gone too
    assert tree(batch) and len(tree(batch)) == len(dests)  # the originals stay with the batch
    with pytest.raises(common.StageError, match="not inside"):
        raw_append.remove_from_raw(raw_dir, ["../elsewhere.dcm"], PARAMS)


def test_remove_from_raw_drops_only_its_labels_csv_rows(tmp_path):
    params = parse_params({"data": {"label_source": "csv"}})
    raw = tmp_path / "raw"
    png(raw / "img/P1_0.png", 10)
    png(raw / "img/P1_1.png", 20)
    old = 'path,label,patient_id\nimg/P1_0.png,normal,P1\n"img/P1_1.png",lesion,P1\n'
    (raw / "labels.csv").write_text(old)
    before = tree(raw)
    batch = tmp_path / "inbox/csv2"
    png(batch / "a.png", 200)
    png(batch / "b.png", 201)
    (batch / "labels.csv").write_text("path,label,patient_id\na.png,lesion,P7\nb.png,normal,P8\n")
    rows, _ = inbox.read_batch(batch, params)
    dests = raw_append.append_to_raw(batch, rows, raw, params)
    assert (raw / "labels.csv").read_text() != old
    raw_append.remove_from_raw(raw, dests, params)
    assert tree(raw) == before  # the old lines keep their exact bytes (quotes included)


def test_without_a_manifest_the_raw_data_is_ingested_for_the_checks(raw, tmp_path):
    raw_dir, manifest = raw
    fresh = inbox.current_manifest(tmp_path / "nowhere/manifest.csv", raw_dir, PARAMS)
    assert sorted(fresh["sha256"]) == sorted(manifest["sha256"])
    assert sorted(fresh["patient"]) == sorted(manifest["patient"])
    batch = tmp_path / "inbox/dup"
    (batch / "lesion").mkdir(parents=True)
    shutil.copy(sorted((raw_dir / "lesion").glob("*.dcm"))[0], batch / "lesion" / "again.dcm")
    _, problems = check(batch, fresh)
    assert any("again.dcm: duplicates raw scan" in p for p in problems), problems
