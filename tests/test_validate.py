"""Validation stage: a clean manifest passes, each kind of bad data fails naming the file/value."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from components.common import StageError, hash_patient, sha256_bytes
from components.data import validate as V
from components.params import Params
from tests.builders import SALT, clean_rows, with_validate, write_manifest
from tests.builders import validate_rows as run


def test_clean_manifest_passes(tmp_path):
    out_json, out_md = run(tmp_path, clean_rows())
    report = json.loads(out_json.read_text())
    assert report["success"] is True and report["failures"] == []
    assert report["suite"] == V.SUITE
    assert all(e["success"] for e in report["expectations"])
    assert report["counts"] == {s: {"normal": 2, "lesion": 2} for s in ("train", "val", "test")}
    # Each entry carries GX's own result, so the verdict is GX's, not ours.
    types = {e["gx"]["expectation_config"]["type"] for e in report["expectations"]}
    assert {
        "expect_column_values_to_be_unique",
        "expect_column_values_to_be_in_set",
        "expect_table_row_count_to_be_between",
    } <= types
    md = out_md.read_text()
    assert md.startswith("# Manifest validation: PASS") and "| sha256_unique |" in md


def _unknown_label(rows):
    rows.append({**rows[0], "path": "tumour/x.png", "sha256": "e" * 64, "label": "tumour"})
    return "tumour/x.png", "label='tumour'"


def _duplicate_across_splits(rows):
    rows[5]["sha256"] = rows[0]["sha256"]  # a train image copied into val
    return rows[5]["path"], rows[0]["path"]


def _duplicate_with_two_labels(rows):
    rows[1]["sha256"] = rows[2]["sha256"]  # the same train image labelled normal and lesion
    return rows[1]["path"], rows[2]["path"]


def _patient_in_two_splits(rows):
    rows[6]["patient"] = rows[0]["patient"]  # val image of a train patient
    return rows[0]["patient"], rows[6]["path"]


def _too_small(rows):
    rows[3]["height"] = 8
    return rows[3]["path"], "height=8"


def _too_few_per_class(rows):
    del rows[10]  # test/lesion keeps one image
    return ("split 'test', class 'lesion': 1 image(s)",)


def _unreadable(rows):
    rows.append(
        dict(
            path="broken.dcm",
            sha256="f" * 64,
            label="",
            patient="",
            width="",
            height="",
            channels="",
            bit_depth="",
            modality="",
            split="",
            error="not a DICOM file",
        )
    )
    return "broken.dcm", "not a DICOM file"


@pytest.mark.parametrize(
    "corrupt, check",
    [
        (_unknown_label, "label_in_classes"),
        (_duplicate_across_splits, "duplicates_in_one_split"),
        (_duplicate_with_two_labels, "duplicates_agree_on_label"),
        (_patient_in_two_splits, "patient_in_one_split"),
        (_too_small, "height_in_range"),
        (_too_few_per_class, "images_per_class_split"),
        (_unreadable, "unreadable_within_limit"),
    ],
)
def test_each_failure_kind_is_critical_and_named(tmp_path, corrupt, check):
    rows = clean_rows()
    expected = corrupt(rows)
    with pytest.raises(StageError) as err:
        run(tmp_path, rows)
    msg = str(err.value)
    assert check in msg and "validation.md" in msg
    for text in expected:
        assert text in msg, f"{text!r} missing from: {msg}"
    # Both reports are written before the stage fails, and they agree with the message.
    report = json.loads((tmp_path / "reports" / "validation.json").read_text())
    assert report["success"] is False
    assert [f["name"] for f in report["failures"] if f["critical"]] == [check]
    md = (tmp_path / "reports" / "validation.md").read_text()
    assert md.startswith("# Manifest validation: FAIL") and f"### {check} (critical)" in md
    assert all(text in md for text in expected)


def test_unreadable_within_limit_passes_but_is_listed(tmp_path):
    rows = clean_rows()
    _unreadable(rows)
    out_json, out_md = run(tmp_path, rows, with_validate(max_unreadable=1))
    report = json.loads(out_json.read_text())
    assert report["success"] is True and report["n_unreadable"] == 1
    assert report["unreadable"] == [{"path": "broken.dcm", "error": "not a DICOM file"}]
    assert "`broken.dcm`: not a DICOM file" in out_md.read_text()


def test_duplicates_within_the_limit_pass_as_a_listed_warning(tmp_path):
    rows = clean_rows()
    copy, original = _duplicate_across_splits(rows)
    out_json, out_md = run(tmp_path, rows, with_validate(max_duplicates=1))
    report = json.loads(out_json.read_text())
    assert report["success"] is True
    assert [(f["name"], f["critical"]) for f in report["failures"]] == [
        ("sha256_unique", False),
        ("duplicates_in_one_split", False),
    ]
    assert copy in out_md.read_text() and original in out_md.read_text()


def test_label_conflicts_within_the_limit_pass_as_a_listed_warning(tmp_path):
    rows = clean_rows()
    first, second = _duplicate_with_two_labels(rows)
    report = json.loads(run(tmp_path, rows, with_validate(max_label_conflicts=1))[0].read_text())
    assert report["success"] is True
    assert ("duplicates_agree_on_label", False) in [(f["name"], f["critical"]) for f in report["failures"]]


def test_duplicates_within_one_split_pass_and_are_listed(tmp_path):
    rows = clean_rows()
    rows[1]["sha256"] = rows[0]["sha256"]  # two normal train images with the same bytes
    out_json, out_md = run(tmp_path, rows)
    report = json.loads(out_json.read_text())
    assert report["success"] is True
    assert [(f["name"], f["critical"]) for f in report["failures"]] == [("sha256_unique", False)]
    assert rows[0]["path"] in out_md.read_text() and rows[1]["path"] in out_md.read_text()


def test_run_suite_on_a_dataframe_without_files(tmp_path):
    rows = clean_rows()
    rows[1]["bit_depth"] = 1  # bilevel: not in the default bit_depths
    rows[2]["width"] = "abc"  # not a number: must fail, not crash or pass silently
    rows[4]["patient"] = ""  # only a warning: it cannot leak, but leakage cannot be checked either
    report = V.run_suite(pd.DataFrame(rows), Params())
    failed = {f["name"]: f for f in report["failures"]}
    assert set(failed) == {"bit_depth_allowed", "width_present", "patient_present"}
    assert "bit_depth=1" in failed["bit_depth_allowed"]["message"]
    assert rows[1]["path"] in failed["bit_depth_allowed"]["message"]
    assert rows[2]["path"] in failed["width_present"]["message"]
    assert failed["patient_present"]["critical"] is False
    assert report["success"] is False
    assert list(tmp_path.iterdir()) == []


def test_long_lists_are_truncated_in_the_message(tmp_path):
    rows = clean_rows()
    for r in rows:
        r["width"] = 4
    with pytest.raises(StageError, match=r"\.\.\. and 2 more"):
        run(tmp_path, rows)


@pytest.mark.slow
def test_output_is_deterministic(tmp_path, monkeypatch):
    """Same manifest, two processes with different hash seeds: byte-identical reports (DVC outs)."""
    rows = clean_rows()
    _duplicate_across_splits(rows)
    write_manifest(tmp_path, rows)
    monkeypatch.chdir(tmp_path)  # the default paths are relative to the project root
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(Params().to_dict()))
    assert V.main(["--manifest", "manifest.csv", "--manifest-json", "manifest.json"]) == 1
    reports = [tmp_path / "reports" / n for n in ("validation.json", "validation.md")]
    first = [p.read_bytes() for p in reports]
    for p in reports:
        p.unlink()
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "components.cli",
            "validate",
            "--manifest",
            "manifest.csv",
            "--manifest-json",
            "manifest.json",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "duplicates_in_one_split" in proc.stderr and "Traceback" not in proc.stderr
    assert "great_expectations" not in proc.stderr  # GX logging stays quiet
    assert [p.read_bytes() for p in reports] == first
    text = first[0].decode()
    assert '"run_id"' not in text and '"time"' not in text and '"id"' not in text


def test_missing_column_and_stale_manifest_json(tmp_path):
    rows = clean_rows()
    with pytest.raises(StageError, match=r"missing column\(s\) \['bit_depth'\]"):
        V.run_suite(pd.DataFrame(rows).drop(columns="bit_depth"), Params())
    csv, js = write_manifest(tmp_path, rows)
    js.write_text(json.dumps({"n_images": 99}))
    with pytest.raises(StageError, match="n_images=99"):
        V.validate(csv, js, tmp_path / "v.json", tmp_path / "v.md", Params())
    assert not (tmp_path / "v.json").exists()


def test_main_exit_codes(tmp_path, capsys):
    csv, js = write_manifest(tmp_path, clean_rows())
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(Params().to_dict()))
    argv = [
        "--params",
        str(params),
        "--manifest",
        str(csv),
        "--manifest-json",
        str(js),
        "--out-json",
        str(tmp_path / "v.json"),
        "--out-md",
        str(tmp_path / "v.md"),
    ]
    assert V.main(argv) == 0
    params.write_text(yaml.safe_dump(with_validate(min_images_per_class_split=3).to_dict()))
    assert V.main(argv) == 1
    assert "images_per_class_split" in capsys.readouterr().err


def _extra_lesions_in_val(rows, n):
    return rows + [
        dict(
            rows[-1],
            path=f"lesion/val_extra{i}.png",
            sha256=sha256_bytes(f"x{i}".encode()),
            patient=hash_patient(f"extra-{i}", SALT),
            split="val",
        )
        for i in range(n)
    ]


def test_a_split_far_from_the_class_balance_fails_naming_the_share(tmp_path):
    rows = _extra_lesions_in_val(clean_rows(), 12)  # lesion: 75% of all images, 50% of train
    with pytest.raises(StageError, match=r"split_balance_within_limit.*class 'lesion' in train: 0.50, expected 0.75"):
        run(tmp_path, rows)


def test_a_small_imbalance_is_a_listed_warning(tmp_path):
    out_json, out_md = run(tmp_path, _extra_lesions_in_val(clean_rows(), 2))  # lesion 8/14 overall, 6/8 in val
    report = json.loads(out_json.read_text())
    failed = {f["name"]: f for f in report["failures"]}
    assert report["success"] and not failed["split_balance_close"]["critical"]
    assert "class 'lesion' in val: 0.67, expected 0.57" in failed["split_balance_close"]["message"]


def test_split_fractions_are_checked_where_ingest_made_the_split(tmp_path):
    csv, js = write_manifest(tmp_path, clean_rows())  # a third of the images in each split
    meta = json.loads(js.read_text())
    js.write_text(
        json.dumps({**meta, "split": {"source": "stratified-group", "val_fraction": 0.2, "test_fraction": 0.25}})
    )
    with pytest.raises(StageError, match=r"images in train: 0.33, expected 0.55"):
        V.validate(csv, js, tmp_path / "v.json", tmp_path / "v.md", Params())
    js.write_text(json.dumps({**meta, "split": {"source": "labels.csv", "val_fraction": 0.2, "test_fraction": 0.25}}))
    V.validate(csv, js, tmp_path / "v.json", tmp_path / "v.md", Params())  # a given split is what it is
