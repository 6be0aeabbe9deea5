"""Retraining a regression (data.task: regression): the inbox reads a batch's `path,target[,patient_id]`
labels.csv, quarantines a batch whose target is not a number with a report naming file, line and value,
and appends the targets to the raw labels.csv; then one real `medtune retrain --once` (a real Prefect
server, DVC and git, a trained challenger) judged against a champion on MAE, lower being better."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from components.data import demo_data
from components.data.ingest import ingest
from components.data.manifest import read_manifest
from components.params import parse_params
from components.retrain import inbox, raw_append
from tests.workspace import merge, tree_digest

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
