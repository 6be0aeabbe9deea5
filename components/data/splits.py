"""The patient-level split: which images are kept together, and which split each group goes to.

    from components.data.splits import split_groups, stable_split, stratified_split

A unit of the split is a patient merged with every patient that shares a byte-identical or
near-duplicate image (`split_groups`), so one picture never sits in train and test at once.

Two ways to split units (`split.method`):
- `stable` (default): a unit keeps the split its images had in the previous manifest, for as long
  as the workspace lives, whatever is appended (yesterday's test image never trains today's model,
  and champion and challenger are compared on the same test images). Units that are new go, one at
  a time in a seeded order, to the split whose share of their class is furthest below its target
  (`split.val_fraction`, `split.test_fraction`), so class balance holds as data grows. Deleting
  data/manifest.csv starts the split afresh.
- `stratified`: StratifiedGroupKFold (exact class balance), test = fold `split.test_fold` of
  round(1 / test_fraction): one run per fold is patient-level k-fold cross-validation. It is
  recomputed from all data each time, so appending data may move existing patients.

In regression (data.task) the "class" both balance is the quantile bin of the target (`strata`): up
to MAX_TARGET_BINS bins of equal share over all readable scans, fewer when the smallest split would
hold fewer than two groups per bin, so every split spans the range of targets.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from components.common import SPLITS, StageError
from components.data.manifest import target_number
from components.params import Params


def split_groups(patients: list[str], hashes: list[str], linked: Sequence[tuple[int, int]] = ()) -> list[str]:
    """The unit the split keeps together, per row: its patient merged (union-find) with every patient
    that shares a byte-identical image (public data holds the same file under two names:
    brain-tumor-yesno does, 22 times) and with the patient of every row `linked` to one of its rows
    (near-duplicate images, by row index). Named by its smallest patient hash."""
    parent: dict[str, str] = {p: p for p in patients}

    def root(p: str) -> str:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    def union(a: str, b: str) -> None:
        a, b = root(a), root(b)
        if a != b:
            parent[max(a, b)] = min(a, b)  # deterministic representative

    first_owner: dict[str, str] = {}
    for patient, digest in zip(patients, hashes):
        union(first_owner.setdefault(digest, patient), patient)
    for i, j in linked:
        union(patients[i], patients[j])
    return [root(p) for p in patients]


MAX_TARGET_BINS = 4


def strata(labels: Sequence[str], units: Sequence[str], params: Params) -> tuple[list[str], list[float] | None]:
    """What the split balances, per row, and the target bins' inner edges (None in classification): the
    label in classification; in regression its target's quantile bin ("q1" the lowest, "" for a row
    without a number). As many bins as the smallest split (val or test) can give two groups each, at
    least 1 and at most MAX_TARGET_BINS: a bin a split cannot fill would leave its targets unseen there."""
    if not params.data.regression:
        return list(labels), None
    values = np.array([target_number(v) for v in labels])
    known = values[np.isfinite(values)]
    smallest = min(params.split.val_fraction, params.split.test_fraction) * len(set(units))  # groups
    n_bins = max(1, min(MAX_TARGET_BINS, int(smallest / 2)))
    if not len(known):
        return [""] * len(labels), []
    edges = [float(e) for e in np.quantile(known, np.arange(1, n_bins) / n_bins)]
    bins = np.searchsorted(edges, values, side="right")
    return [f"q{b + 1}" if np.isfinite(v) else "" for b, v in zip(bins, values)], edges


def targets(params: Params, splits: Sequence[str] = SPLITS) -> dict[str, float]:
    """Each split's target share of the images, over `splits` only (renormalised)."""
    sp = params.split
    share = {"train": 1 - sp.val_fraction - sp.test_fraction, "val": sp.val_fraction, "test": sp.test_fraction}
    total = sum(share[s] for s in splits)
    return {s: share[s] / total for s in splits}


def stable_split(
    labels: Sequence[str],
    units: Sequence[str],
    patients: Sequence[str],
    previous: Mapping[str, str],
    params: Params,
    splits: Sequence[str] = SPLITS,
) -> list[str]:
    """A split per row (module doc): a unit whose patients had a split in `previous` (patient -> split)
    keeps it; new units go where their main class is furthest below the `targets` share."""
    rows: dict[str, list[int]] = defaultdict(list)
    for i, unit in enumerate(units):
        rows[unit].append(i)
    out = [""] * len(labels)
    have = {s: Counter() for s in splits}  # images per class in each split so far
    new = []
    for unit, members in rows.items():
        old = Counter(previous[patients[i]] for i in members if previous.get(patients[i]) in splits)
        if not old:
            new.append(unit)
            continue
        # Two kept units joined by a new duplicate: the larger keeps the group; validate names any leak.
        split = max(splits, key=lambda s: old[s])
        for i in members:
            out[i] = split
        have[split].update(labels[i] for i in members)
    share = targets(params, splits)
    for unit in sorted(new, key=lambda u: hashlib.sha256(f"{params.split.seed}:{u}".encode()).hexdigest()):
        members = rows[unit]
        counts = Counter(labels[i] for i in members)
        main = max(sorted(counts), key=counts.__getitem__)
        total = sum(have[s][main] for s in splits) + counts[main]
        split = max(splits, key=lambda s: share[s] * total - have[s][main])  # the largest shortfall
        for i in members:
            out[i] = split
        have[split].update(counts)
    return out


def stratified_split(labels: list[str], patients: list[str], params: Params) -> list[str]:
    """train/val/test per row: patient-level, stratified by label, deterministic for split.seed."""
    sp = params.split
    n_test = sp.n_folds
    n_val = max(2, round((1 - sp.test_fraction) / sp.val_fraction))  # val_fraction is of the whole
    n_patients = len(set(patients))
    if n_patients < n_test + 1:
        raise StageError(
            f"only {n_patients} patient(s) among the readable images; a patient-level "
            f"train/val/test split with test_fraction {sp.test_fraction} needs at least "
            f"{n_test + 1}. Add data, or give labels.csv a split column."
        )
    y, groups = np.asarray(labels, dtype=object), np.asarray(patients, dtype=object)
    out = np.full(len(labels), "train", dtype=object)
    with warnings.catch_warnings():
        # "least populated class has fewer members than n_splits": the validate stage checks counts.
        warnings.simplefilter("ignore", UserWarning)
        folds = StratifiedGroupKFold(n_test, shuffle=True, random_state=sp.seed).split(y, y, groups)
        _, test = list(folds)[sp.test_fold]  # the folds are disjoint and cover every patient: k-fold CV
        out[test] = "test"
        rest = np.flatnonzero(out == "train")
        if len(set(groups[rest])) >= n_val:
            _, val = next(
                StratifiedGroupKFold(n_val, shuffle=True, random_state=sp.seed).split(y[rest], y[rest], groups[rest])
            )
            out[rest[val]] = "val"
    return list(out)


def require_val(splits: Sequence[str], n_patients: int, params: Params) -> None:
    if "val" not in splits:
        raise StageError(
            f"only {n_patients} patient(s): none left for the validation split "
            f"(val_fraction {params.split.val_fraction}); add data or lower split.test_fraction."
        )


def check_overlap(patients: Sequence[str], paths: Sequence[str], splits: Sequence[str], source: str) -> None:
    """StageError naming a patient (hashed) found in two splits, with some of its files."""
    seen: dict[str, set[str]] = defaultdict(set)
    for patient, split in zip(patients, splits):
        if split:
            seen[patient].add(split)
    shared = [p for p, s in seen.items() if len(s) > 1]
    if shared:
        files = [f for f, p in zip(paths, patients) if p == shared[0]][:4]
        raise StageError(
            f"patient {shared[0]} (hashed) is in splits {sorted(seen[shared[0]])} (files {files}); "
            f"the split from {source} must keep each patient in one split. "
            f"{len(shared)} patient(s) affected."
        )
