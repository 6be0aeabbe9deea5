"""Near-duplicate images: one picture stored twice with small changes that a byte hash misses
(re-encoded, resized, re-windowed, another export of the same frame).

Public sets hold many. In BreastMNIST's official split, 48 of the 156 test images share a group
with a training image, so a model is partly tested on pictures it trained on; PneumoniaMNIST's test split has none, and its 27 groups are its byte-identical files. Where
ingest makes the split, such images are kept together like byte-identical ones; where the split is
given (labels.csv), validate reports the groups that cross it.

Each readable image has a 32 x 32 grey thumbnail (`scan_info.ScanInfo.thumbnail`, taken while ingest
probes the file), standardised here to zero mean and unit norm; two images are near-duplicates
when the Pearson correlation of their thumbnails, a dot product here, is at least the threshold
(`split.near_duplicate_correlation`). A group is an image and the later images (in path order)
that each match it directly (`leaders`): likeness is not transitive, so it is never chained. A
correlation ignores brightness and contrast, so neither a DICOM window nor another exposure of the
same picture hides it. Thumbnails of different chest X-rays correlate at about 0.9, so the default
0.99 is well above chance likeness.

How pairs are found (`linked`), so that the answer never depends on which images were compared
together (ingest compares only new images with the rest, and must find what a full search finds):
- Exact decisions. Each standardised thumbnail is kept as its `signature`: integers (SCALE = 2^25
  per unit). A dot product of two signatures is an integer below 2^53, so float64 arithmetic gives
  it exactly in any order of summation (any BLAS blocking, one row or ten thousand); the pair test
  `dot >= threshold * SCALE^2` is then the same bit for bit in every run. (Rounding to integers
  moves a correlation by about 1e-8, below float32's own error.)
- A cheap filter first. Two unit vectors with correlation c are sqrt(2 - 2c) apart, and an
  orthogonal projection never lengthens a distance; the mean over 4 x 4 blocks (`project`, 64
  numbers) is such a projection. Pairs farther apart than that in 64 numbers are ruled out without
  a full product; the few left are confirmed with their signatures, pair by pair. All n^2 / 2 pairs are still
  considered, at 1/16 of the arithmetic, BLOCK x BLOCK at a time (memory stays flat in n).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

BLOCK = 2048  # rows compared at a time: BLOCK x BLOCK float32 (16 MB), whatever the number of images
SCALE = 2.0**25  # a signature's unit: |dot| <= SCALE^2 (plus rounding) < 2^53, so float64 sums are exact
SIDE = 8  # project: the thumbnail's mean over SIDE x SIDE blocks
PAIRS = 2048  # candidate pairs confirmed at a time: two PAIRS x pixels float64 gathers (16 MB each at 32 x 32)
PAIR_COST = 128  # one pair's gathered dot ~ this many cells of a BLAS product (110-220 measured, 2 cores)
MARGIN = 1e-3  # slack on the filter's squared distance: float32 rounding must never rule out a true pair


def standardise(thumbnails: Sequence[np.ndarray]) -> np.ndarray:
    """(n, pixels) float32: each thumbnail flattened, at zero mean and unit norm (zeros if flat)."""
    x = np.stack([np.asarray(t, np.float32).ravel() for t in thumbnails])
    x -= x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def signature(thumbnail: np.ndarray | None, size: int) -> np.ndarray:
    """int32 (size * size,): one thumbnail standardised and scaled to integers (module doc); zeros for
    None (a readable scan without a thumbnail is alike none). One image at a time, always: the same
    thumbnail then gives the same integers whichever images it is computed with."""
    if thumbnail is None:
        return np.zeros(size * size, np.int32)
    return np.rint(standardise([thumbnail])[0].astype(np.float64) * SCALE).astype(np.int32)


def project(signatures: np.ndarray) -> np.ndarray:
    """(n, SIDE^2) float32: the orthogonal projection of each standardised thumbnail onto images that
    are constant on SIDE x SIDE blocks (block sums / block side), so distances only shrink."""
    n, pixels = signatures.shape
    size = int(round(pixels**0.5))
    step = size // SIDE
    blocks = signatures.astype(np.float64).reshape(n, SIDE, step, SIDE, step).sum(axis=(2, 4))
    return (blocks.reshape(n, SIDE * SIDE) / (step * SCALE)).astype(np.float32)


def _augment(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Projections extended so that one product gives squared distances: [a, |a|^2, 1] . [-2b, 1, |b|^2]."""
    sq, one = (p * p).sum(axis=1, keepdims=True), np.ones((len(p), 1), np.float32)
    return np.hstack([p, sq, one]), np.hstack([-2 * p, one, sq])


def linked(
    pa: np.ndarray,
    pb: np.ndarray,
    vectors_a: Callable[[np.ndarray], np.ndarray],
    vectors_b: Callable[[np.ndarray], np.ndarray],
    threshold: float,
    same: bool = False,
    self_pairs: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(i, j) index arrays, block by block, of every row i of a and j of b whose thumbnails correlate
    at >= threshold. pa, pb: `project`ions; vectors_a(rows), vectors_b(rows): their signatures (fetched
    only for the rows the filter leaves). same: a and b are one set, so only i < j (i <= j with
    self_pairs: an image alike itself, i.e. not flat)."""
    bound, reach = threshold * SCALE * SCALE, 2 - 2 * threshold + MARGIN
    left, _ = _augment(pa)
    _, right = _augment(pb)
    for a0 in range(0, len(pa), BLOCK):
        for b0 in range(a0 if same else 0, len(pb), BLOCK):
            ok = left[a0 : a0 + BLOCK] @ right[b0 : b0 + BLOCK].T <= reach  # squared distance of projections
            if not ok.any():
                continue
            i, j = np.nonzero(ok)
            i += a0
            j += b0
            if same:
                keep = j >= i if self_pairs else j > i
                i, j = i[keep], j[keep]
            if not len(i):
                continue
            rows, ri = np.unique(i, return_inverse=True)
            cols, cj = np.unique(j, return_inverse=True)
            hit = _exact_dots(vectors_a(rows), vectors_b(cols), ri, cj) >= bound
            yield i[hit], j[hit]


def _exact_dots(a: np.ndarray, b: np.ndarray, ai: np.ndarray, bj: np.ndarray) -> np.ndarray:
    """float64 dot of signature rows a[ai[n]] and b[bj[n]], for each candidate pair n. The filter
    usually leaves a few pairs per row yet touches most rows and columns: then each pair's own dot
    (PAIRS at a time) is far less work than a rows x columns product; when the pairs are dense (alike
    images, e.g. slices of one body), the product is cheaper (a pair's own dot costs about
    PAIR_COST cells of it, measured). Exact in any summation order: every partial sum is an integer
    no larger than the product of the norms (SCALE^2 < 2^53)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    if len(ai) * PAIR_COST > len(a) * len(b):
        return (a @ b.T)[ai, bj]
    out = np.empty(len(ai), np.float64)
    for s in range(0, len(ai), PAIRS):
        out[s : s + PAIRS] = np.einsum("ij,ij->i", a[ai[s : s + PAIRS]], b[bj[s : s + PAIRS]])
    return out


def pairs(thumbs: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """(i, j), i < j, sorted, for every two rows of `thumbs` (from `standardise`) correlated at >= threshold."""
    q = np.rint(np.asarray(thumbs, np.float64) * SCALE).astype(np.int32)
    p = project(q)
    found = [
        (int(a), int(b))
        for i, j in linked(p, p, q.__getitem__, q.__getitem__, threshold, same=True)
        for a, b in zip(i, j)
    ]
    return sorted(found)


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
