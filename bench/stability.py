"""Split stability: how many existing images change split when data is appended.

    python -m bench stability

2,000 synthetic 32 px PNG scans (one per patient, two classes), then ten appends of 20 new patients
each, ingested after every append: once with `split.method: stable` (the default) and once with
`stratified` (StratifiedGroupKFold recomputed from all the data). Printed: the images of the first
2,000 that ever left their first split, and the largest per-split class-share deviation at the end.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from components.data.ingest import ingest
from components.params import parse_params

CLASSES = ("normal", "lesion")


def _write(raw: Path, patients: range) -> None:
    for p in patients:
        label = CLASSES[p % 2]
        (raw / label).mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(p).integers(0, 255, (32, 32), dtype=np.uint8)
        Image.fromarray(pixels).save(raw / label / f"p{p:05d}.png")


def _class_deviation(split: pd.Series) -> float:
    overall = split.index.str.startswith("lesion/").mean()
    return max(
        abs(split[split == s].index.str.startswith("lesion/").mean() - overall) for s in ("train", "val", "test")
    )


def bench_stability(n: int = 2000, appends: int = 10, k: int = 20) -> dict:
    result = {}
    for method in ("stable", "stratified"):
        params = parse_params(
            {"data": {"patient_pattern": r"^(?P<patient>p\d+)"}, "split": {"method": method}, "compute": {"workers": 1}}
        )
        with tempfile.TemporaryDirectory() as tmp:
            raw, out = Path(tmp) / "raw", Path(tmp) / "data"
            _write(raw, range(n))
            first = ingest(raw, out, params).set_index("path")["split"]
            moved = pd.Series(False, index=first.index)
            for batch in range(appends):
                _write(raw, range(n + batch * k, n + (batch + 1) * k))
                now = ingest(raw, out, params).set_index("path")["split"]
                moved |= now[first.index] != first
            result[method] = {"moved": int(moved.sum()), "of": n, "class_deviation": round(_class_deviation(now), 4)}
    print(
        f"stability  images of the first {n} that changed split over {appends} appends of {k}: "
        f"stable {result['stable']['moved']}, stratified {result['stratified']['moved']} | "
        f"max class-share deviation per split at the end: stable {result['stable']['class_deviation']:.3f}, "
        f"stratified {result['stratified']['class_deviation']:.3f}"
    )
    return result
