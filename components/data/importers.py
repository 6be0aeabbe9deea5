"""Importers: turn a public dataset (an .npz file or a folder tree) into scans plus labels.csv for ingest.

    medtune import-npz pneumoniamnist.npz --out data/raw --classes normal,pneumonia   # components.data.npz_import
    medtune import-folders downloads/chest_xray --out data/raw                        # components.data.folder_import

This module holds what both share: the refusal to import over an earlier import, the params.yaml
lines that make the pipeline read the result, and the per-class counts they print.

Both importers only read their input and write labels.csv last, so its presence marks a complete
import; import-folders checks the whole tree before copying anything and refuses to run over an
existing labels.csv.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from components import common


def refuse_earlier_import(out_dir: Path) -> None:
    labels = out_dir / "labels.csv"
    if labels.exists():
        raise common.StageError(
            f"{labels} already exists; refusing to overwrite an earlier import. Expected an "
            "output folder without labels.csv: choose another --out or remove that folder."
        )


def params_hint(out_dir: Path, classes: list[str]) -> str:
    """The params.yaml lines that make the pipeline read what an importer wrote."""
    return (
        f"Set in params.yaml:\n"
        f"  data:\n    raw_dir: {Path(out_dir).as_posix()}\n    label_source: csv\n"
        f"    classes: [{', '.join(classes)}]\n"
        f"  evaluate:\n    positive_class: {classes[-1]}   # the class whose detection 'sensitivity' means\n"
        f"then run `dvc add {Path(out_dir).as_posix()}` and `dvc repro`."
    )


def counts(table: pd.DataFrame) -> str:
    """'train/a: 3, train/b: 4, ...' (or 'a: 3, ...' without a split column), sorted."""
    keys = [k for k in ("split", "label") if k in table.columns]
    sizes = table.groupby(keys).size()
    return ", ".join(f"{'/'.join(k if isinstance(k, tuple) else (k,))}: {n}" for k, n in sorted(sizes.items()))
