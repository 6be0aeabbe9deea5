"""The tables validate checks: the manifest normalised (text cells, numeric columns) and the tables
derived from it with pandas (patient -> split pairs, counts per split and class, unreadable and
skipped files, split shares), so every verdict in the report is a GX result on some table.

    df = validation_tables.normalise(manifest_df, "data/manifest.csv")
    tables = validation_tables.build_tables(df, classes, manifest_json)   # {table name: DataFrame}
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from components.common import SPLITS, StageError
from components.data import folders

COLUMNS = ("path", "sha256", "label", "patient", "width", "height", "bit_depth", "split", "error")
TEXT_COLUMNS = ("path", "sha256", "label", "patient", "split", "error", "modality", "similar_group")
NUMERIC_COLUMNS = ("width", "height", "bit_depth")


def normalise(df: pd.DataFrame, source: str) -> pd.DataFrame:
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise StageError(
            f"{source}: missing column(s) {missing}; expected at least {list(COLUMNS)} (rerun `medtune ingest`)."
        )
    df = df.copy()
    for col in TEXT_COLUMNS:
        if col in df.columns:
            df[col] = _text_or_none(df[col])
    if "similar_group" not in df.columns:  # a manifest from before near-duplicates were found
        df["similar_group"] = None
    for col in NUMERIC_COLUMNS:
        # Non-numbers become missing and fail the *_present checks instead of crashing GX.
        s = pd.to_numeric(df[col], errors="coerce")
        if s.dropna().mod(1).eq(0).all():
            s = s.astype("Int64")
        df[col] = s
    return df.reset_index(drop=True)


def _text_or_none(column: pd.Series) -> pd.Series:
    """Each value as text, None where missing, empty or blank: that means "no value", whichever way the
    frame was built; other values are kept exactly (a label "normal " must still fail, not be fixed
    here). numpy's string functions, not a Python call per row."""
    values = column.to_numpy(dtype=object)
    missing = pd.isna(values)
    text = np.where(missing, "", values).astype(str)
    # A string column's values are kept as they are (no new objects); any other is made text.
    out = values.copy() if isinstance(column.dtype, pd.StringDtype) else text.astype(object)
    out[missing | (np.strings.str_len(np.strings.strip(text)) == 0)] = None
    return pd.Series(out, index=column.index, dtype=object)


def _split_balance(readable: pd.DataFrame, split: dict[str, Any] | None) -> pd.DataFrame:
    """One row per share the split should keep: each split's share of the images (only where ingest
    made the split: a given one is what it is), and each class's share within each split against
    its share of all images. `deviation` is |realised - expected|."""
    rows = []
    n = len(readable)
    if n and split and split.get("source") != "labels.csv":
        test, val = float(split.get("test_fraction", 0)), float(split.get("val_fraction", 0))
        for name, expected in (("train", 1 - test - val), ("val", val), ("test", test)):
            rows.append((f"images in {name}", (readable["split"] == name).sum() / n, expected))
    overall = readable["label"].value_counts(normalize=True)
    for name, part in readable.groupby("split"):
        share = part["label"].value_counts(normalize=True)
        rows += [(f"class {label!r} in {name}", share.get(label, 0.0), overall[label]) for label in overall.index]
    table = pd.DataFrame(rows, columns=["share", "realised", "expected"]).astype({"realised": float, "expected": float})
    table["deviation"] = (table["realised"] - table["expected"]).abs().round(4)
    return table


def _skipped(meta: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(meta.get("skipped") or [], columns=["path", "reason"], dtype=object)


def build_tables(df: pd.DataFrame, classes: list[str], meta: dict[str, Any]) -> dict[str, pd.DataFrame]:
    readable = df[df["error"].isna()]
    pairs, similar = (
        (
            readable.dropna(subset=[col, "split"])[[col, "split"]]
            .drop_duplicates()
            .sort_values([col, "split"])
            .reset_index(drop=True)
        )
        for col in ("patient", "similar_group")
    )
    # Every (split, class) appears, with 0 when absent, so a missing split or class fails too.
    grid = pd.MultiIndex.from_product([SPLITS, classes], names=["split", "label"])
    counts = readable.groupby(["split", "label"]).size().reindex(grid, fill_value=0).rename("n").reset_index()
    counts["n"] = counts["n"].astype("int64")
    unreadable = df[df["error"].notna()][["path", "error"]]
    hash_splits, hash_labels = (
        readable.dropna(subset=["sha256", col])[["sha256", col]]
        .drop_duplicates()
        .sort_values(["sha256", col])
        .reset_index(drop=True)
        for col in ("split", "label")
    )
    skipped = _skipped(meta)
    return {
        "files": df,
        "unreadable": unreadable,
        "readable": readable,
        "skipped": skipped,
        "skipped_visible": skipped[skipped["reason"] != folders.HIDDEN].reset_index(drop=True),
        "split_balance": _split_balance(readable.dropna(subset=["split", "label"]), meta.get("split")),
        "hash_splits": hash_splits,
        "hash_labels": hash_labels,
        "patient_splits": pairs,
        "similar_splits": similar,
        "class_split_counts": counts,
    }
