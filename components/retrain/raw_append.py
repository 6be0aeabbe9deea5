"""A checked batch into the raw data, and out again when the pipeline then fails.

    dests = raw_append.append_to_raw(batch, rows, "data/raw", params)   # the new raw paths
    raw_append.remove_from_raw("data/raw", dests, params)               # undo (workspace.restore_workspace)

A batch goes in under its own name, in the raw data's own layout: `raw/<class>/<batch>/...`
(folder-per-class) or `raw/<batch>/...` plus its rows appended to raw labels.csv (csv mode: each new
line `path,label`, with data.task regression `path,target` holding the target the batch check read,
then the batch's patient_id and split where raw labels.csv has those columns). Existing raw files
are never modified or removed, and the copy is idempotent, so a crashed retrain resumes.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from components import common
from components.common import StageError
from components.data.labels_csv import parse_labels_csv
from components.params import Params

log = logging.getLogger("medtune.inbox")  # the batch's whole way through the inbox logs under one name


def raw_destination(batch_name: str, rel: str, label: str, params: Params) -> str:
    """Where a batch file goes under raw_dir, keeping the raw data's own layout."""
    if params.data.label_source == "folder":
        return f"{label}/{batch_name}/{Path(rel).name if '/' in rel else rel}" if label else rel
    return f"{batch_name}/{rel}"


def appended_paths(batch_name: str, rows: pd.DataFrame, params: Params) -> list[str]:
    return [raw_destination(batch_name, r.path, r.label, params) for r in rows.itertuples(index=False)]


def append_to_raw(batch_dir: str | Path, rows: pd.DataFrame, raw_dir: str | Path, params: Params) -> list[str]:
    """Copy a checked batch into raw_dir without touching existing files; return the new raw paths.

    Idempotent: a file already at its destination with the same sha256 is left alone (a resumed
    run); a different file there is an error (the batch name was used before). In csv mode the
    batch's rows are appended to raw labels.csv (rewritten atomically, existing lines unchanged).
    """
    batch, raw = Path(batch_dir), Path(raw_dir)
    dests = appended_paths(batch.name, rows, params)
    if len(set(dests)) != len(dests):
        raise StageError(f"{batch}: two files map to the same raw path; file names must be unique per class.")
    for dest in dests:
        target = raw / dest
        if target.exists() and target.is_dir():
            raise StageError(f"{target} is a folder; expected nothing or a file there.")
    plan = []
    for r, dest in zip(rows.itertuples(index=False), dests):
        target = raw / dest
        if target.exists():
            if common.sha256_file(target) != r.sha256:
                raise StageError(
                    f"{target} already exists with other content; batch name {batch.name!r} was used "
                    "before: rename the batch folder and drop it again."
                )
            continue
        plan.append((batch / r.path, target))
    for src, target in plan:
        with common.atomic_path(target) as tmp:
            shutil.copyfile(src, tmp)
    if params.data.label_source == "csv":
        _append_labels(raw / params.data.labels_csv, batch, rows, dests, params.data.regression)
    log.info(
        "appended batch %s to %s: %d new file(s), %d already there", batch.name, raw, len(plan), len(dests) - len(plan)
    )
    return dests


def _append_labels(labels_csv: Path, batch: Path, rows: pd.DataFrame, dests: list[str], regression: bool) -> None:
    # Regression: the batch rows' `label` is the checked target as canonical text (labels_csv), which
    # goes into the raw file's `target` column; ingest reads both spellings of a number alike.
    column = "target" if regression else "label"
    existing = (
        pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
        if labels_csv.is_file()
        else pd.DataFrame(columns=["path", column])
    )
    have = set(existing["path"])
    new_paths = [d for d in dests if d not in have]
    if not new_paths:
        return
    # Read again, not carried from read_batch: the batch rows travel between flow tasks (and so into
    # Prefect's result storage), and they must hold only hashed patients; raw ids stay in raw labels.csv.
    src = parse_labels_csv(batch / "labels.csv", regression) if (batch / "labels.csv").is_file() else None
    extra = pd.DataFrame({"path": dests, column: rows["label"].tolist()})
    if src is not None:
        by = {p: i for i, p in enumerate(src["path"])}
        for col in ("patient_id", "split"):
            if col in src.columns:
                extra[col] = [src[col].iloc[by[p]] if p in by else "" for p in rows["path"]]
    for col in existing.columns:
        if col not in extra.columns:
            extra[col] = ""
    unknown = [c for c in extra.columns if c not in existing.columns]
    if unknown and len(existing):
        raise StageError(
            f"{batch / 'labels.csv'}: column(s) {unknown} are not in {labels_csv}; the batch must use "
            f"the raw labels.csv columns {list(existing.columns)}."
        )
    extra = extra[extra["path"].isin(new_paths)]
    header = not labels_csv.is_file() or labels_csv.stat().st_size == 0
    old = labels_csv.read_text(encoding="utf-8") if not header else ""
    if old and not old.endswith("\n"):
        old += "\n"
    cols = list(existing.columns) if len(existing.columns) else list(extra.columns)
    common.write_text(labels_csv, old + extra[cols].to_csv(index=False, header=header, lineterminator="\n"))


def remove_from_raw(raw_dir: str | Path, paths: Sequence[str], params: Params) -> list[str]:
    """Undo `append_to_raw` for `paths` (raw-relative; the caller passes only files a batch put there
    that the committed data version does not hold). Returns the paths removed.

    Removes those files, then the folders that became empty (never raw_dir itself); in csv mode
    drops exactly the raw labels.csv lines naming them (every other line kept byte for byte).
    """
    import csv

    raw = Path(raw_dir).resolve()
    removed = []
    for rel in paths:
        target = (raw / rel).resolve()
        if raw not in target.parents:
            raise StageError(f"{rel!r} is not inside {raw}; refusing to remove it.")
        if target.is_file():
            target.unlink()
            removed.append(rel)
        parent = target.parent
        while parent != raw and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    labels_csv = raw / params.data.labels_csv
    if params.data.label_source == "csv" and labels_csv.is_file() and paths:
        drop = {Path(x).as_posix() for x in paths}
        text = labels_csv.read_text(encoding="utf-8")
        lines = text.splitlines(keepends=True)
        kept = lines[:1] + [ln for ln in lines[1:] if not ln.strip() or next(csv.reader([ln]), [""])[0] not in drop]
        if len(kept) != len(lines):
            common.write_text(labels_csv, "".join(kept))
    if removed:
        log.warning("removed %d file(s) of a failed run's batch from %s", len(removed), raw)
    return removed
