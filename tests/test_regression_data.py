"""Regression data (data.task: regression): labels.csv targets, the manifest, splits, validate and
preprocess on synthetic scans whose target (a lesion's diameter in mm) is drawn in them."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from components.data import demo_data


def _labels(raw: Path) -> list[dict[str, str]]:
    with open(raw / "labels.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_regression_demo_draws_its_target_and_repeats_its_bytes(tmp_path):
    n = demo_data.generate_regression(tmp_path / "a", patients=6, seed=1, size=32, slices=2)
    demo_data.generate_regression(tmp_path / "b", patients=6, seed=1, size=32, slices=2)
    rows = _labels(tmp_path / "a")
    assert n == len(rows) == 12 and list(rows[0]) == ["path", "target", "patient_id"]
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert len({r["patient_id"] for r in rows}) == 6
    # The lesion is the bright disc: its area gives back the diameter (2.5 mm ... 5 mm a pixel at 32 px).
    targets, measured = [], []
    for r in rows:
        pixels = np.asarray(Image.open(tmp_path / "a" / r["path"]))
        measured.append(2 * np.sqrt((pixels > 160).sum() / np.pi) * demo_data.REGRESSION_FOV_MM / 32)
        targets.append(float(r["target"]))
    assert np.corrcoef(targets, measured)[0, 1] > 0.98
    assert max(targets) - min(targets) > 10  # a spread to learn, not one value
