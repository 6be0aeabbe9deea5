"""labels.csv: the labels of a folder of scans (and, optionally, each file's patient and split).

    path,label[,patient_id][,split]       # a header line, then one row per scan file
    path,target[,patient_id][,split]      # data.task: regression (a `label` column is ignored)

Paths are relative to the folder. A regression target must be a finite number; the table's `label`
is then its canonical text, repr(float(target)) ("60" and "6e1" both give "60.0"), so the manifest's
bytes do not depend on how the CSV spelt the number. ingest reads the raw folder's
(data.label_source: csv); the retrain inbox reads a batch's, and appends its rows to the raw one.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from components import common
from components.common import SPLITS
from components.data import folders
from components.params import Params


def parse_labels_csv(csv_path: Path, regression: bool = False) -> pd.DataFrame:
    """A labels.csv as stripped strings with posix paths and its `line` numbers; StageError naming the
    file (and line) if it cannot be read, lacks path or label (regression: target), names a path twice,
    or has a path that is absolute or climbs out of its folder (folders.check_relative). In regression
    `label` is each row's target as canonical text (`canonical_targets`). Shared by ingest and the inbox."""
    label = "target" if regression else "label"
    try:
        # utf-8-sig: spreadsheet programs write a byte-order mark that would rename the first column.
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise common.StageError(f"{csv_path}: not a readable CSV ({exc}).") from None
    except UnicodeDecodeError as exc:
        raise common.StageError(
            f"{csv_path}: not UTF-8 text (byte {exc.object[exc.start : exc.start + 1]!r} at "
            f"offset {exc.start}); expected a UTF-8 CSV: save it as UTF-8."
        ) from None
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in ("path", label) if c not in table.columns]
    if missing:
        raise common.StageError(
            f"{csv_path}: missing column(s) {missing}; found {list(table.columns)}, expected "
            f"a header line path,{label}[,patient_id][,split]."
        )
    table = table.map(str.strip)
    table["line"] = np.arange(len(table)) + 2  # header is line 1
    try:
        table["path"] = [
            folders.check_relative(p, f"{csv_path} line {n}") for p, n in zip(table["path"], table["line"])
        ]
    except ValueError as exc:
        raise common.StageError(str(exc)) from None
    dupes = table[table["path"].duplicated(keep=False)]
    if len(dupes):
        first = dupes.iloc[0]
        raise common.StageError(
            f"{csv_path}: path {first['path']!r} appears on lines "
            f"{list(dupes[dupes['path'] == first['path']]['line'])}; expected one row per file."
        )
    if regression:
        table["label"] = canonical_targets(table, csv_path)
    return table


def canonical_targets(table: pd.DataFrame, csv_path: Path) -> list[str]:
    """repr(float(target)) of each row of a parsed labels.csv; StageError naming the file, line and value
    of the first target that is not a finite number (text, empty, nan, inf, or beyond a float's range)."""
    out = []
    for value, line, path in zip(table["target"], table["line"], table["path"]):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise common.StageError(
                f"{csv_path} line {line} ({path}): target = {value!r}; expected a finite number "
                "(data.task is regression), e.g. 42 or 3.5."
            )
        out.append(repr(number))
    return out


def labels_file(folder: Path, name: str) -> Path:
    """folder / name, the labels file; StageError if the name leaves the folder (an absolute path, '..',
    or a link to outside): it is read from there and its rows copied into the raw data."""
    try:
        return folders.path_inside(folder, name, "data.labels_csv")
    except ValueError as exc:
        raise common.StageError(str(exc)) from None


def read_labels_csv(raw_dir: Path, params: Params, files: list[str]) -> pd.DataFrame:
    """labels.csv indexed by path; errors for missing columns, duplicates and rows without a file."""
    csv_path = labels_file(raw_dir, params.data.labels_csv)
    label = "target" if params.data.regression else "label"
    if not csv_path.is_file():
        raise common.StageError(
            f"{csv_path} not found; data.label_source is 'csv', so it must exist with "
            f"columns path,{label}[,patient_id][,split] (paths relative to the raw folder)."
        )
    table = parse_labels_csv(csv_path, params.data.regression)
    known = set(files)
    absent = table[~table["path"].isin(known)]
    if len(absent):
        shown = ", ".join(f"line {r.line}: {r.path!r}" for r in absent.head(5).itertuples())
        raise common.StageError(
            f"{csv_path}: {len(absent)} row(s) name no scan file under {raw_dir} ({shown}); "
            "paths must be relative to the raw folder and point to PNG/JPEG/DICOM files."
        )
    if "split" in table.columns:
        bad = table[~table["split"].isin(SPLITS)]
        if len(bad):
            r = bad.iloc[0]
            raise common.StageError(
                f"{csv_path} line {r['line']} ({r['path']}): split = {r['split']!r}; expected one of {list(SPLITS)}."
            )
    return table.set_index("path")
