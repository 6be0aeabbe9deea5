"""New labelled batches: find them in the inbox, check each on its own, quarantine or append to raw.

    medtune ingest-new path/to/batch      # copy a batch into the inbox (atomically) and emit the event
    medtune retrain --once                # what the retrain flow does with it

A batch is one folder directly under `retrain.inbox_dir`, laid out like the raw data: either
folder-per-class (`<batch>/<class>/<file>`) or files plus `labels.csv` (`path,label[,patient_id]
[,split]`, paths relative to the batch; with data.task regression `path,target[,patient_id][,split]`,
each target a finite number, read as ingest reads it: components.data.labels_csv). Folders whose
name starts with "." or "_" are ignored, so a batch being copied in (under a dot-name, then renamed)
is never picked up half-written.

Checks (each names the file and the value): no scans at all; unreadable files (`scan_info.probe`);
labels missing or not in `data.classes` (regression: a target missing, or not a finite number,
named by labels.csv line and value); sizes and bit depths outside `validate.*`; files that
duplicate a scan already in the raw data or another file of the batch (sha256); patients already
present in the raw data. Patient rule: a batch must bring new patients. A batch patient already in
`data/manifest.csv` is accepted only when the batch's labels.csv gives it a `split` equal to the
split that patient already has; otherwise adding it would either put one patient in two splits or
silently move the patient's existing scans, so the batch is rejected.

A bad batch is moved, unchanged, to `retrain.quarantine_dir/<batch>-<time>/batch/` next to a
`report.json` and `report.md`. A good batch is copied into the raw data under its own name
(`raw/<class>/<batch>/...` or `raw/<batch>/...` plus rows appended to raw labels.csv;
components.retrain.raw_append); existing raw files are never modified or removed, and the copy is
idempotent, so a crashed retrain resumes. When the pipeline then fails, `raw_append.remove_from_raw`
takes exactly the batch's files (and labels.csv lines) out again and the batch goes to quarantine with
the error (flows/retrain.py).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from components import common
from components.common import StageError
from components.data import folders, ingest
from components.data.labels_csv import labels_file, parse_labels_csv
from components.data.manifest import COLUMNS, read_manifest
from components.params import Params
from components.retrain.inbox_listing import find_batches  # noqa: F401 - the flow's listing, light for the CLI

log = logging.getLogger("medtune.inbox")

EVENT = "medtune.inbox.batch-added"  # emitted by `medtune ingest-new`; the retrain deployment's trigger
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ---------------------------------------------------------------------------------------------
# Finding batches
# ---------------------------------------------------------------------------------------------


def project_resource(root: str | Path) -> str:
    """Prefect resource id of this project's inbox (so two projects on one server do not cross-trigger)."""
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:12]
    return f"medtune.inbox.{digest}"


def add_to_inbox(source: str | Path, inbox_dir: str | Path, name: str | None = None) -> Path:
    """Copy a batch folder into the inbox atomically (copy under a dot-name, then rename).

    The source is only read. Returns the batch folder in the inbox.
    """
    source = Path(source)
    if not source.is_dir():
        raise StageError(
            f"ingest-new: {source} is not a folder; expected a batch folder with class "
            "sub-folders or files plus labels.csv."
        )
    name = name or source.resolve().name
    if not _NAME_OK.match(name):
        raise StageError(
            f"ingest-new: batch name {name!r} is invalid; expected letters, digits, '.', '_', '-' "
            "and no leading '.' or '_' (pass --name)."
        )
    inbox = Path(inbox_dir)
    inbox.mkdir(parents=True, exist_ok=True)
    target = inbox / name
    if target.exists():
        raise StageError(f"ingest-new: {target} already exists; the inbox holds a batch of that name (pass --name).")
    too_large = folders.list_folder(source).with_reason(folders.TOO_LARGE)
    if too_large:  # copying it would take minutes and the disk space; no check could accept it
        raise StageError(
            f"ingest-new: {source / too_large[0]} is {folders.TOO_LARGE}; "
            f"{len(too_large)} such file(s). Remove them from the batch."
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".incoming-{name}-", dir=inbox))
    try:
        # symlinks=True: a link is copied as a link, never its target's bytes; the batch check then
        # quarantines a link that leaves the batch (components.data.folders) before anything reads it.
        shutil.copytree(source, tmp / "b", symlinks=True, ignore=shutil.ignore_patterns(".*"))
        os.rename(tmp / "b", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# Reading and checking one batch
# ---------------------------------------------------------------------------------------------


def read_batch(batch_dir: str | Path, params: Params) -> tuple[pd.DataFrame, list[str]]:
    """One row per file of the batch (manifest-shaped, plus `split` from labels.csv if given).

    Returns (rows, problems-found-while-reading). Each file is read by ingest's own `scan_row`, so the
    patient is resolved as ingest will after the append: labels.csv `patient_id` (csv mode), else the
    DICOM PatientID, else `data.patient_pattern` on the file name; else empty (each image its own
    patient). Patient ids are hashed there and never kept raw.
    """
    batch = Path(batch_dir)
    salt = common.patient_salt(params.data.patient_salt)
    pattern = params.data.patient_regex()
    regression = params.data.regression
    problems: list[str] = []
    labels = None
    try:
        labels_csv = labels_file(batch, "labels.csv")
        if labels_csv.is_file():
            # Regression: each row's `label` is its target as canonical text, as ingest will write it.
            labels = parse_labels_csv(labels_csv, regression)
    except StageError as exc:  # one bad row or header (a target that is no number) quarantines the batch
        return pd.DataFrame(columns=COLUMNS), [str(exc)]
    if regression and labels is None:  # a regression's targets are in labels.csv only, never in folder names
        problems.append(
            f"{labels_csv}: not found; expected labels.csv with path,target[,patient_id][,split] "
            "(data.task is regression)."
        )
    listing = folders.list_folder(batch)
    # Hidden entries are tool state (ingest-new does not even copy dot-names); anything else that is
    # not a scan, or a link out of the batch, means the batch is not what its sender thinks it is.
    problems += [f"{batch / s.path}: {s.reason}." for s in listing.skipped if s.reason != folders.HIDDEN]
    if labels is not None and params.data.label_source == "folder":
        # In folder mode the batch's files join class folders and its labels.csv is not kept, so a
        # patient_id or split given there would be dropped without a word.
        problems += [
            f"{labels_csv}: column {col!r} cannot be kept: the raw data is folder-per-class "
            "(data.label_source: folder); expected only path,label, or raw data with labels.csv."
            for col in ("patient_id", "split")
            if col in labels.columns
        ]
    if labels is not None:
        scan_set = set(listing.scans)
        problems += [
            f"{labels_csv} line {r.line}: path {r.path!r} is not a scan file of the batch."
            for r in labels.itertuples()
            if r.path not in scan_set
        ]
    by_path = {} if labels is None else labels.set_index("path").to_dict("index")
    rows = []
    for rel in listing.scans:
        f = batch / rel
        csv_row = by_path.get(rel, {})
        label = csv_row.get("label", "") if labels is not None or regression else ingest.folder_label(rel)
        # A batch's CSV patient_id only survives the append in csv mode.
        patient = csv_row.get("patient_id", "") if params.data.label_source == "csv" else ""
        row, source, _ = ingest.scan_row(f, rel, label, patient, pattern, salt)
        row["split"] = csv_row.get("split", "")
        if source == "none":
            row["patient"] = ""  # no id: never a known patient
        rows.append(row)
    common.warn_public_salt(params.data.patient_salt, str(batch), sum(1 for r in rows if r["patient"]), log)
    return pd.DataFrame(rows, columns=COLUMNS), problems


def current_manifest(manifest_csv: str | Path, raw_dir: str | Path, params: Params) -> pd.DataFrame:
    """What is in the raw data now: data/manifest.csv, or (fresh checkout, never ingested) a real
    ingest of raw_dir into a temporary folder, so duplicates and known patients are still caught."""
    if Path(manifest_csv).is_file() or not Path(raw_dir).is_dir():
        return read_manifest(manifest_csv, missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="medtune-manifest-") as tmp:
        try:
            return ingest.ingest(Path(raw_dir), Path(tmp), params).astype(str)
        except StageError as exc:
            # The raw data cannot be split yet (e.g. too few patients): hashes and patients still count.
            log.warning(
                "ingest of %s for the batch checks failed (%s); checking against file hashes only", raw_dir, exc
            )
            files = ingest.find_scans(Path(raw_dir), params.data.labels_csv).scans
            return pd.DataFrame(
                {
                    "path": files,
                    "sha256": [common.sha256_file(Path(raw_dir) / rel) for rel in files],
                    "label": "",
                    "patient": "",
                    "split": "",
                    "error": "",
                }
            )


def check_batch(
    batch_dir: str | Path,
    rows: pd.DataFrame,
    manifest: pd.DataFrame,
    params: Params,
    already_appended: Sequence[str] = (),
    raw_labels: str | Path | None = None,
) -> list[str]:
    """Problems with one batch, each naming the file, the value and what was expected ([] = good).

    `already_appended`: manifest paths that are this batch's own earlier copy in raw (a resumed
    run), which must not count as duplicates or known patients. `raw_labels`: the raw data's
    labels.csv (csv mode), whose split column, if it has one, the batch's scans must fill too.
    """
    batch = Path(batch_dir)
    problems: list[str] = []
    if not _NAME_OK.match(batch.name):
        problems.append(f"{batch}: batch name {batch.name!r} is invalid; expected letters, digits, '.', '_', '-'.")
    if rows.empty:
        layout = "files plus labels.csv" if params.data.regression else "class sub-folders or files plus labels.csv"
        return problems + [f"{batch}: no scans found; expected {layout}."]
    existing = manifest[~manifest["path"].isin(set(already_appended))]
    return (
        problems
        + _file_problems(batch, rows, params)
        + _split_problems(batch, rows)
        + _missing_split_problems(batch, rows, raw_labels)
        + _duplicate_problems(batch, rows, existing)
        + _known_patient_problems(batch, rows, existing)
    )


def _file_problems(batch: Path, rows: pd.DataFrame, params: Params) -> list[str]:
    """Each file on its own: unreadable, label (regression: target), size, bit depth, split."""
    classes = list(params.data.classes)
    regression = params.data.regression
    v = params.validate
    problems: list[str] = []
    for r in rows.itertuples(index=False):
        where = batch / r.path
        if r.error:
            problems.append(f"{where}: unreadable ({r.error}).")
            continue
        if not r.label and regression:  # a target that is there was checked when labels.csv was read
            problems.append(f"{where}: no target; expected a labels.csv row path,target with a finite number.")
        elif not r.label:
            problems.append(f"{where}: no label; expected a class folder or a labels.csv row with one of {classes}.")
        elif not regression and r.label not in classes:
            problems.append(f"{where}: label {r.label!r} is unknown; expected one of data.classes {classes}.")
        if not (v.min_size <= int(r.width) <= v.max_size and v.min_size <= int(r.height) <= v.max_size):
            problems.append(
                f"{where}: size {r.width}x{r.height} is outside validate.min_size..max_size {v.min_size}..{v.max_size}."
            )
        if int(r.bit_depth) not in v.bit_depths:
            problems.append(f"{where}: bit depth {r.bit_depth} is not one of validate.bit_depths {v.bit_depths}.")
        if r.split and r.split not in common.SPLITS:
            problems.append(f"{where}: split {r.split!r} is invalid; expected train, val or test.")
    return problems


def _split_problems(batch: Path, rows: pd.DataFrame) -> list[str]:
    """Patients the batch's labels.csv puts in two splits."""
    problems: list[str] = []
    split_of = rows[(rows["patient"] != "") & (rows["split"] != "")].groupby("patient")["split"].unique()
    for patient, splits in split_of[split_of.map(len) > 1].items():
        paths = list(rows.loc[rows["patient"] == patient, "path"])[:4]
        problems.append(
            f"{batch}: patient {patient} (hashed) is in splits {sorted(splits)} within the batch "
            f"({paths}); expected each patient in one split."
        )
    return problems


def _missing_split_problems(batch: Path, rows: pd.DataFrame, raw_labels: str | Path | None) -> list[str]:
    """Scans without a split when the raw labels.csv has a split column: appended with an empty split,
    they would stop the whole-data ingest after the append (labels_csv.read_labels_csv wants one of
    train, val, test on every row), failing the run instead of quarantining the batch now."""
    if raw_labels is None or not Path(raw_labels).is_file():
        return []
    with open(raw_labels, encoding="utf-8-sig", newline="") as fh:
        header = [c.strip() for c in next(csv.reader(fh), [])]
    missing = rows.loc[rows["split"] == "", "path"].tolist()
    if "split" not in header or not missing:
        return []
    return [
        f"{batch}: {len(missing)} scan(s) have no split ({', '.join(missing[:3])}"
        f"{', ...' if len(missing) > 3 else ''}); {raw_labels} gives every scan its split (column split), so "
        "the batch's labels.csv must too: expected a split column with train, val or test on each row."
    ]


def _duplicate_problems(batch: Path, rows: pd.DataFrame, existing: pd.DataFrame) -> list[str]:
    """Files whose bytes (sha256) another file of the batch, or a raw scan already in the data, has."""
    problems: list[str] = []
    dup_in_batch = rows[rows.duplicated("sha256", keep="first")]
    for r in dup_in_batch.itertuples(index=False):
        first = rows.loc[rows["sha256"] == r.sha256, "path"].iloc[0]
        problems.append(f"{batch / r.path}: duplicates {batch / first} in the same batch (sha256 {r.sha256[:12]}).")
    known = dict(zip(existing["sha256"], existing["path"]))
    for r in rows.itertuples(index=False):
        if r.sha256 in known:
            problems.append(
                f"{batch / r.path}: duplicates raw scan {known[r.sha256]!r} already in the data "
                f"(sha256 {r.sha256[:12]})."
            )
    return problems


def _known_patient_problems(batch: Path, rows: pd.DataFrame, existing: pd.DataFrame) -> list[str]:
    """Patient rule (module docstring): a known patient only with an explicit, identical split."""
    problems: list[str] = []
    have = existing[existing["patient"] != ""].groupby("patient")["split"].agg(lambda s: sorted(set(s) - {""}))
    for r in rows.itertuples(index=False):
        if r.patient and r.patient in have.index:
            splits = have[r.patient]
            if not (r.split and splits == [r.split]):
                problems.append(
                    f"{batch / r.path}: patient {r.patient} (hashed) is already in the raw data "
                    f"(split {'/'.join(splits) or 'unassigned'}); a batch must bring new patients, "
                    "or give that patient the same split in labels.csv."
                )
    return problems


# ---------------------------------------------------------------------------------------------
# Outcomes: quarantine, archive (the append: components.retrain.raw_append)
# ---------------------------------------------------------------------------------------------


def _stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def quarantine(
    batch_dir: str | Path, quarantine_dir: str | Path, problems: Sequence[str], context: dict[str, Any] | None = None
) -> Path:
    """Move the batch, unchanged, to quarantine_dir/<batch>-<time>/batch and write the report beside it."""
    batch = Path(batch_dir)
    dest = Path(quarantine_dir) / f"{batch.name}-{_stamp()}"
    dest.mkdir(parents=True, exist_ok=False)
    report = {
        "batch": batch.name,
        "source": str(batch),
        "quarantined_at": _stamp(),
        "problems": list(problems),
        **(context or {}),
    }
    # The report first: if the move fails the report still says why, and the batch stays in the inbox.
    common.write_json(dest / "report.json", report)
    if (context or {}).get("failure"):
        intro = (
            "The batch passed its own checks and was appended, then the pipeline failed (below). The "
            "workspace was restored to the last committed data version and the current model stays. "
            "The failed run's reports are in `failed-run/` beside this file. Fix the cause (the batch, or the data/parameters it ran into) and drop it into the inbox again."
        )
    else:
        intro = (
            f"{len(problems)} problem(s); nothing was retrained and the current model stays. Fix the batch "
            "and drop it into the inbox again."
        )
    md = [f"# Quarantined batch `{batch.name}`", "", intro, ""]
    md += [f"- {p}" for p in problems[:200]]
    if len(problems) > 200:
        md.append(f"- ... and {len(problems) - 200} more (report.json)")
    common.write_text(dest / "report.md", "\n".join(md) + "\n")
    shutil.move(str(batch), str(dest / "batch"))
    log.warning("quarantined batch %s -> %s: %d problem(s), first: %s", batch.name, dest, len(problems), problems[0])
    return dest


def archive(batch_dir: str | Path, processed_dir: str | Path) -> Path:
    """Move an appended batch out of the inbox (kept, never deleted) so it is not picked up again."""
    batch = Path(batch_dir)
    dest = Path(processed_dir) / f"{batch.name}-{_stamp()}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(batch), str(dest))
    return dest


def summary_table(rows: pd.DataFrame, regression: bool = False) -> list[dict[str, Any]]:
    """Per label x split counts of a batch (regression: per split, the count and range of its targets),
    for a report or a Prefect table artifact."""
    if rows.empty:
        return []
    if regression:  # a missing target ("") counts as a file, not in the range
        targets = pd.to_numeric(rows["label"], errors="coerce").groupby(rows["split"].replace("", "(pipeline)"))
        return [
            {
                "split": k,
                "files": int(t.size),
                "target_min": None if t.isna().all() else float(t.min()),
                "target_max": None if t.isna().all() else float(t.max()),
            }
            for k, t in targets
        ]
    counts = rows.assign(split=rows["split"].replace("", "(pipeline)")).groupby(["label", "split"]).size()
    return [{"label": k[0], "split": k[1], "files": int(n)} for k, n in counts.items()]
