"""data/manifest.csv, the table of raw files that ingest writes and every later step reads.

One row per file under the raw folder: its path (relative to the raw folder), sha256, label, hashed
patient, what ingest probed (size, channels, bit depth, modality), its group of near-duplicate
images (`similar_group`: the group's first path, empty when it has none; components.data.near_duplicates),
its split, and the reason it could not be read (`error`, empty for a readable file). validate, preprocess, inbox, registry and
the audit tools all read it through `read_manifest`, so each sees the same cells (every value as
text, an empty cell as "") and fails the same loud way on a missing or malformed file.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from components.common import SPLITS, StageError

if TYPE_CHECKING:  # pandas is imported on use: the audit tools read manifests and must start fast
    import pandas as pd

COLUMNS = [
    "path",
    "sha256",
    "label",
    "patient",
    "width",
    "height",
    "channels",
    "bit_depth",
    "modality",
    "similar_group",
    "split",
    "error",
]
# What a reader may rely on. The audit tools ask only for the listing that ingest's content_hash
# covers, so that they still read the manifest of any earlier release.
KEY_COLUMNS = ("path", "sha256", "label", "patient", "split", "error")
LISTING_COLUMNS = ("path", "sha256")


def _read(path: str | Path, required: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the manifest at `path`, every cell as text ("" when empty)."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path} not found; run `medtune ingest` (dvc repro ingest) first.")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            lines = list(csv.reader(fh))
    except (csv.Error, UnicodeDecodeError) as exc:
        raise StageError(f"{path}: not a readable manifest CSV ({exc}); rerun `medtune ingest`.") from None
    header, rows = (lines[0], lines[1:]) if lines else ([], [])
    missing = [c for c in required if c not in header]
    if missing:
        raise StageError(
            f"{path}: missing column(s) {missing} (found {header}); expected the manifest.csv "
            "written by `medtune ingest`."
        )
    for number, fields in enumerate(rows, start=2):
        if len(fields) != len(header):
            raise StageError(
                f"{path}: line {number} has {len(fields)} fields; expected {len(header)} "
                f"({', '.join(header)}). Rerun `medtune ingest`."
            )
    return header, rows


def read_manifest_rows(path: str | Path, required: Sequence[str] = KEY_COLUMNS) -> list[dict[str, str]]:
    """The rows of the manifest at `path` as dicts of text ("" when empty: a label "NA" stays "NA").

    StageError naming the file if it is absent, not a readable CSV, has a row whose number of
    fields differs from the header's, or lacks one of the `required` columns.
    """
    header, rows = _read(path, required)
    return [dict(zip(header, fields)) for fields in rows]


def read_manifest(path: str | Path, required: Sequence[str] = KEY_COLUMNS, missing_ok: bool = False) -> pd.DataFrame:
    """`read_manifest_rows` as a table of text columns; with `missing_ok`, an absent file is an empty
    table with COLUMNS."""
    import pandas as pd

    if missing_ok and not Path(path).is_file():
        return pd.DataFrame(columns=COLUMNS, dtype=str)
    header, rows = _read(path, required)
    return pd.DataFrame(rows, columns=header, dtype=str)


def target_stats(labels: Sequence[str], splits: Sequence[str]) -> dict[str, dict[str, float | int | None]]:
    """Regression (data.task): per split, the count, mean, std (population, ddof 0), min and max of the
    targets, i.e. the labels that read as finite numbers (validate fails the others; None for a
    split without any). Recorded in manifest.json and data/prepared/meta.json."""
    import numpy as np

    values = np.array([target_number(v) for v in labels], dtype=np.float64)
    splits = np.asarray(splits, dtype=object)
    out = {}
    for split in SPLITS:
        mine = values[(splits == split) & np.isfinite(values)]
        out[split] = {"count": len(mine)} | {
            name: (float(fn(mine)) if len(mine) else None)
            for name, fn in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max))
        }
    return out


def target_number(text: str) -> float:
    """A regression label (the manifest's text) as a float; nan when it is not a number (empty, text)."""
    try:
        return float(text)
    except ValueError:
        return float("nan")
