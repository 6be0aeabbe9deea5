"""Near-duplicate images: one picture stored twice with small changes that a byte hash misses
(re-encoded, resized, re-windowed, another export of the same frame).

Public sets hold many. In BreastMNIST's official split, 46 of the 156 test images share a group
with a training image (43 of them its label), so a model is partly tested on pictures it trained
on; PneumoniaMNIST's test split has none, and its 27 groups are its byte-identical files. Where
ingest makes the split, such images are kept together like byte-identical ones; where the split is
given (labels.csv), validate reports the groups that cross it.

Each readable image has a 32 x 32 grey thumbnail (`scans.ScanInfo.thumbnail`, taken while ingest
probes the file), standardised here to zero mean and unit norm; two images are near-duplicates
when the Pearson correlation of their thumbnails, a dot product here, is at least the threshold
(`split.near_duplicate_correlation`). A correlation ignores brightness and contrast, so neither a
DICOM window nor another exposure of the same picture hides it. Thumbnails of different chest X-rays correlate at about 0.9,
so the default 0.99 is well above chance likeness. All pairs are compared (n^2 / 2 dot products of
SIZE^2 values: about a second for 6,000 images on 2 cores, minutes for 100,000).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

BLOCK = 512  # rows compared at a time: BLOCK x n float32 (200 MB for 100,000 images)


def standardise(thumbnails: Sequence[np.ndarray]) -> np.ndarray:
    """(n, pixels) float32: each thumbnail flattened, at zero mean and unit norm (zeros if flat)."""
    x = np.stack([np.asarray(t, np.float32).ravel() for t in thumbnails])
    x -= x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def pairs(thumbs: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """(i, j), i < j, for every two rows of `thumbs` (from `standardise`) correlated at >= threshold."""
    found: list[tuple[int, int]] = []
    for start in range(0, len(thumbs), BLOCK):
        sim = thumbs[start:start + BLOCK] @ thumbs.T
        i, j = np.nonzero(sim >= threshold)
        i += start
        found += [(int(a), int(b)) for a, b in zip(i, j) if a < b]
    return found


def groups(paths: Sequence[str], linked: Sequence[tuple[int, int]]) -> list[str]:
    """Per path, the first (sorted) path of its group of near-duplicates; "" for a path without any."""
    n = len(paths)
    if not linked:
        return [""] * n
    i, j = np.array(linked).T
    _, label = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)), directed=False)
    first: dict[int, str] = {}
    for path, g in zip(paths, label):
        first[g] = min(first.get(g, path), path)
    size = np.bincount(label)
    return [first[g] if size[g] > 1 else "" for g in label]
