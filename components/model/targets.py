"""A regression's targets (data.task: regression): the `target` column of data/prepared/index.csv, read
and checked (`targets`), and the train split's mean and standard deviation that standardise them for
training (`target_stats`). Train and evaluate share them.

    images, index = load_split(prepared_dir, "train")
    y = targets(prepared_dir, index, "train")      # float64 (N,), the target's own unit
    mean, std = target_stats(y)                    # the model learns (y - mean) / std
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.common import StageError


def targets(prepared_dir: str | Path, index: Any, split: str) -> np.ndarray:
    """The `target` column of one split's index rows (float64); StageError naming the file, the row's
    path and the value unless every one is a finite number."""
    csv = Path(prepared_dir) / "index.csv"
    if "target" not in index.columns:
        raise StageError(
            f"{csv} has no target column; expected the regression targets preprocess writes with "
            "data.task regression: rerun preprocess (dvc repro)."
        )
    values = np.asarray(pd.to_numeric(index["target"], errors="coerce"), dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        i = int(bad[0])
        raise StageError(
            f"{csv}: {split} row {i} ({index['path'].iloc[i]}) has target {index['target'].iloc[i]!r}; "
            "expected a finite number."
        )
    return values


def target_stats(y_train: np.ndarray) -> tuple[float, float]:
    """(mean, standard deviation) of the train targets that standardise them; a standard deviation
    of 0 (every target equal) is taken as 1, so standardising only shifts."""
    mean, std = float(np.mean(y_train)), float(np.std(y_train))
    return mean, (std if std > 0 else 1.0)
