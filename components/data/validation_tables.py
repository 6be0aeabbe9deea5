"""The tables validate checks: the manifest normalised (text cells, numeric columns) and the tables
derived from it with pandas (patient -> split pairs, counts per split and class, unreadable and
skipped files, split shares), so every verdict in the report is a GX result on some table.

    df = validation_tables.normalise(manifest_df, "data/manifest.csv")
    tables = validation_tables.build_tables(df, classes, manifest_json)   # {table name: DataFrame}

In regression (data.task) the label is a number: `readable` gains `target` (the label as a float,
NaN, i.e. missing to GX, where it is not a finite number), the counts are per split (label "images"), and the split's
balance is checked on the target's bins (the edges ingest split by, manifest.json
split.target_bin_edges) instead of on classes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from components.common import SPLITS, StageError
from components.data import folders
from components.data.manifest import target_number

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


def _split_balance(readable: pd.DataFrame, split: dict[str, Any] | None, what: str = "class") -> pd.DataFrame:
    """One row per share the split should keep: each split's share of the images (only where ingest
    made the split: a given one is what it is), and each class's (`what`: or target bin's) share within
    each split against its share of all images. `deviation` is |realised - expected|."""
    rows = []
    n = len(readable)
    if n and split and split.get("source") != "labels.csv":
        test, val = float(split.get("test_fraction", 0)), float(split.get("val_fraction", 0))
        for name, expected in (("train", 1 - test - val), ("val", val), ("test", test)):
            rows.append((f"images in {name}", (readable["split"] == name).sum() / n, expected))
    overall = readable["label"].value_counts(normalize=True)
    for name, part in readable.groupby("split"):
        share = part["label"].value_counts(normalize=True)
        rows += [(f"{what} {label!r} in {name}", share.get(label, 0.0), overall[label]) for label in overall.index]
    table = pd.DataFrame(rows, columns=["share", "realised", "expected"]).astype({"realised": float, "expected": float})
    table["deviation"] = (table["realised"] - table["expected"]).abs().round(4)
    return table


def _skipped(meta: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(meta.get("skipped") or [], columns=["path", "reason"], dtype=object)


def _targets(labels: pd.Series) -> pd.Series:
    """Each label as a finite float (manifest.target_number), NaN where it is not one (empty, text, nan, inf)."""
    values = np.array([np.nan if v is None else target_number(v) for v in labels], dtype=np.float64)
    return pd.Series(np.where(np.isfinite(values), values, np.nan), index=labels.index)


def _target_bins(readable: pd.DataFrame, meta: dict[str, Any]) -> pd.DataFrame:
    """readable's rows with a target, labelled by its bin: the edges ingest split by (manifest.json), or
    the quartiles of the targets when the manifest.json predates them."""
    rows = readable.dropna(subset=["split", "target"])
    targets = rows["target"].to_numpy()
    edges = (meta.get("split") or {}).get("target_bin_edges")
    if edges is None:
        edges = [float(e) for e in np.quantile(targets, [0.25, 0.5, 0.75])] if len(rows) else []
    bounds = [-np.inf, *edges, np.inf]
    names = [_bin_name(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    return rows.assign(label=[names[i] for i in np.searchsorted(edges, targets, side="right")])


def _bin_name(lo: float, hi: float) -> str:
    if np.isinf(lo) and np.isinf(hi):
        return "all"
    if np.isinf(lo):
        return f"< {hi:g}"
    return f">= {lo:g}" if np.isinf(hi) else f"[{lo:g}, {hi:g})"


def _split_counts(readable: pd.DataFrame, classes: list[str], regression: bool) -> pd.DataFrame:
    """Images per (split, class), every pair present (0 when absent, so a missing split or class fails
    too); in regression per split, with label "images"."""
    if regression:
        readable = readable.assign(label="images")
        classes = ["images"]
    grid = pd.MultiIndex.from_product([SPLITS, classes], names=["split", "label"])
    counts = readable.groupby(["split", "label"]).size().reindex(grid, fill_value=0).rename("n").reset_index()
    counts["n"] = counts["n"].astype("int64")
    return counts


def build_tables(
    df: pd.DataFrame, classes: list[str], meta: dict[str, Any], regression: bool = False
) -> dict[str, pd.DataFrame]:
    readable = df[df["error"].isna()]
    if regression:
        readable = readable.assign(target=_targets(readable["label"]))
    pairs, similar = (
        (
            readable.dropna(subset=[col, "split"])[[col, "split"]]
            .drop_duplicates()
            .sort_values([col, "split"])
            .reset_index(drop=True)
        )
        for col in ("patient", "similar_group")
    )
    counts = _split_counts(readable, classes, regression)
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
        "split_balance": _split_balance(_target_bins(readable, meta), meta.get("split"), "target")
        if regression
        else _split_balance(readable.dropna(subset=["split", "label"]), meta.get("split")),
        "hash_splits": hash_splits,
        "hash_labels": hash_labels,
        "patient_splits": pairs,
        "similar_splits": similar,
        "class_split_counts": counts,
    }
