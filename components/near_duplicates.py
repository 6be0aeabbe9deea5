"""Near-duplicate images: one picture stored twice with small changes that a byte hash misses
(re-encoded, resized, re-windowed, another export of the same frame).

Public sets hold many. In BreastMNIST's official split, 48 of the 156 test images share a group
with a training image, so a model is partly tested on pictures it trained on; PneumoniaMNIST's test split has none, and its 27 groups are its byte-identical files. Where
ingest makes the split, such images are kept together like byte-identical ones; where the split is
given (labels.csv), validate reports the groups that cross it.

Each readable image has a 32 x 32 grey thumbnail (`scans.ScanInfo.thumbnail`, taken while ingest
probes the file), standardised here to zero mean and unit norm; two images are near-duplicates
when the Pearson correlation of their thumbnails, a dot product here, is at least the threshold
(`split.near_duplicate_correlation`). A group is an image and the later images (in path order)
that each match it directly (`leaders`): likeness is not transitive, so it is never chained. A
correlation ignores brightness and contrast, so neither a DICOM window nor another exposure of the
same picture hides it. Thumbnails of different chest X-rays correlate at about 0.9, so the default
0.99 is well above chance likeness. All pairs are compared (n^2 / 2 dot products of
SIZE^2 values: about a second for 6,000 images on 2 cores, minutes for 100,000).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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


def leaders(n: int, linked: Sequence[tuple[int, int]]) -> list[int]:
    """Per row, the row of its group's first image ("leader"), in row order: an image joins the first
    earlier leader it matches, or leads a group of its own.

    Every member matches its leader directly, so likeness cannot chain: with connected components,
    A~B and B~C put A and C together however unlike they are, and a series of similar images (slices
    of synthetic scans, a sweep of exposures) became one group holding a whole split."""
    earlier: dict[int, list[int]] = {}
    for i, j in linked:
        earlier.setdefault(max(i, j), []).append(min(i, j))
    leader = list(range(n))
    for j in range(n):
        heads = [i for i in earlier.get(j, ()) if leader[i] == i]
        if heads:
            leader[j] = min(heads)
    return leader


def links(leader: Sequence[int]) -> list[tuple[int, int]]:
    """(leader, member) for every member of a group: what the split keeps together."""
    return [(head, j) for j, head in enumerate(leader) if head != j]


def groups(paths: Sequence[str], leader: Sequence[int]) -> list[str]:
    """Per path, its leader's path when its group has two or more images, else "" (paths in row order)."""
    size = np.bincount(np.asarray(leader, dtype=np.int64), minlength=len(paths)) if len(paths) else []
    return [paths[head] if size[head] > 1 else "" for head in leader]
