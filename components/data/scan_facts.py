"""What ingest learns from each scan file, learnt once per file content and kept in data/cache/facts.

    found = scan_facts.gather(Path("data/raw"), files, Path("data/cache/facts"), salt, params.compute)
    found.facts[i]               # Fact of files[i]: sha256, header facts or the error, DICOM patient hash
    found.links(rows, 0.99)      # near-duplicate pairs (i, j) among those rows (components.data.near_duplicates)

Per file, ingest needs its sha256, what `scan_info.probe` reads (width, height, channels, bit depth,
modality, or why it is unreadable), the HMAC hash of its DICOM PatientID and its near-duplicate
signature. All of it depends only on the file's bytes and on the reader that opens it
(`scans.decoder`: the extension can decide), so it is stored under that key, once: an append of k
scans decodes those k, and compares their signatures with the others, not every pair again.

The cache folder (components.data.fact_shards) is a persistent DVC output of the ingest stage, which a
clone gets by `dvc pull`: append-only shards of up to SHARD_ROWS facts each, and the near-duplicate
pairs found between them.

Patients: a fact holds only the HMAC hash of the DICOM PatientID, with `salt_fingerprint` of the
salt that made it (an HMAC of a constant under that salt, which does not reveal it). A fact made
under another salt is never used: the file is read again and its new fact goes in a new shard.

Which file has which key is the stat index (components/data/stat_index.py: relative path -> size,
mtime_ns, inode, sha256, decoder), machine-local and outside the DVC output. A file whose stat
differs is hashed again, and decoded only if its content is new; a clone therefore hashes every
file once and decodes none. Preprocess reads the same index to skip re-hashing unchanged scans.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components import common
from components.data import folders, near_duplicates, scan_info, scans, stat_index
from components.data.fact_shards import PATH_MARK, Fact, Store
from components.parallel import decode_seconds, map_files
from components.params import ComputeParams

log = logging.getLogger("medtune.scan_facts")

SHARD_ROWS = 4096  # facts per shard: also the files decoded (and their signatures held) at a time
HASH_HERE_BYTES = 256 * 2**20  # files to hash below this many bytes in all are hashed in this process


def salt_fingerprint(salt: bytes) -> str:
    """Which salt hashed a patient, without revealing it: an HMAC of a constant under the salt."""
    return hmac.new(salt, b"medtune scan_facts salt fingerprint", hashlib.sha256).hexdigest()[:16]


# --------------------------------------------------------------------------- per-file work (workers)


def hash_file(path: str) -> tuple[str, str]:
    """(sha256, decoder) of one file; sha256 "" for one over scans.MAX_FILE_BYTES, which is never read."""
    p = Path(path)
    return ("" if p.stat().st_size > scans.MAX_FILE_BYTES else common.sha256_file(p)), scans.decoder(p)


def probe_file(salt: bytes, item: tuple[str, str, str]) -> tuple[Fact, np.ndarray]:
    """The Fact of one file (path, sha256, decoder) and its near-duplicate signature (zeros if unreadable).
    The PatientID is hashed here, so the raw id never leaves the process that read it."""
    path, sha256, decoder = item
    size = Path(path).stat().st_size
    try:
        info = scan_info.probe(Path(path))
    except scans.ScanError as exc:
        # Without the path: the manifest must not change with where the checkout (or the worker) lives.
        error = str(exc).removeprefix(f"{path}: ").replace(path, PATH_MARK)
        return Fact(sha256, decoder, size, error=error), near_duplicates.signature(None, scan_info.THUMBNAIL)
    patient = common.hash_patient(info.patient_id, salt) if info.patient_id else ""
    fact = Fact(
        sha256,
        decoder,
        size,
        info.width,
        info.height,
        info.channels,
        info.bit_depth,
        info.modality,
        patient=patient,
        salt=salt_fingerprint(salt) if patient else "",
    )
    return fact, near_duplicates.signature(info.thumbnail, scan_info.THUMBNAIL)


# --------------------------------------------------------------------------- gathering


@dataclass
class Found:
    facts: list[Fact]  # per file, in the order given
    store: Store

    def links(self, rows: Sequence[int], threshold: float) -> list[tuple[int, int]]:
        """(i, j), i < j: positions in `rows` (files, by index) whose scans are near-duplicates."""
        at: dict[str, list[int]] = {}
        for n, row in enumerate(rows):
            at.setdefault(self.facts[row].key, []).append(n)
        out = set()
        for a, b in self.store.key_pairs(threshold):
            if a == b:  # byte-identical files, alike themselves
                out.update((x, y) for x in at.get(a, ()) for y in at[a] if x < y)
            else:
                out.update((min(x, y), max(x, y)) for x in at.get(a, ()) for y in at.get(b, ()))
        return sorted(out)


def gather(
    raw_dir: Path,
    files: Sequence[str],
    cache_dir: Path,
    salt: bytes,
    compute: ComputeParams,
    listing: folders.Listing | None = None,
) -> Found:
    """The Fact of every file (paths relative to raw_dir), reading only what the cache lacks (module doc).
    `listing`: the folders.Listing that found the files, whose stats are used (else each file is stat'ed)."""
    raw_dir, cache_dir = Path(raw_dir), Path(cache_dir)
    store = Store.open(cache_dir, salt_fingerprint(salt))
    index_file = stat_index.index_path(cache_dir, raw_dir)
    # Absolute: a Dask worker would resolve a relative path against its own working directory.
    root = Path(os.path.abspath(raw_dir))
    base = os.fspath(root)
    # listed_ns: a clock reading from before the stats were taken (stat_index's racy rule needs that).
    if listing is not None:
        listed_ns, stats = listing.started_ns, [list(listing.stats[rel]) for rel in files]
    else:
        listed_ns = time.time_ns()
        stats = [stat_index.stat_key(os.stat(os.path.join(base, rel))) for rel in files]
    index = stat_index.read(index_file)
    ids: list[tuple[str, str] | None] = [
        tuple(index[rel][3:5]) if index.get(rel, [None])[:3] == st else None for rel, st in zip(files, stats)
    ]
    todo = [i for i, known in enumerate(ids) if known is None]
    paths = [os.path.join(base, files[i]) for i in todo]
    # Hashing is bound by reading: a few hundred MB take a core a second or less, while starting a
    # process pool (or reaching a cluster) takes about as long; only a larger volume is spread out.
    if sum(stats[i][0] for i in todo) < HASH_HERE_BYTES:
        hashed = [hash_file(p) for p in paths]
    else:
        hashed = map_files(hash_file, paths, compute, desc="hash")
    for i, found in zip(todo, hashed):
        ids[i] = found
    uncached: dict[str, int] = {}  # key -> the first file with it, for keys the store lacks
    for i, (sha, decoder) in enumerate(ids):
        if f"{sha}/{decoder}" not in store.facts:
            uncached.setdefault(f"{sha}/{decoder}" if sha else f"/{i}", i)
    log.info(
        "%s: %d scan(s), %d hashed, %d read (the rest known to %s)",
        raw_dir,
        len(files),
        len(todo),
        len(uncached),
        cache_dir,
    )
    direct = _probe(root, files, ids, list(uncached.values()), [st[0] for st in stats], store, salt, compute)
    stat_index.write(index_file, listed_ns, {rel: [*st, *ids[i]] for i, (rel, st) in enumerate(zip(files, stats))})
    return Found([direct.get(i) or store.facts[f"{sha}/{decoder}"] for i, (sha, decoder) in enumerate(ids)], store)


def _probe(
    raw_dir: Path,
    files: Sequence[str],
    ids: list,
    todo: list[int],
    sizes: Sequence[int],
    store: Store,
    salt: bytes,
    compute: ComputeParams,
) -> dict[int, Fact]:
    """Read the files `todo` (indices; `sizes` in bytes per file), SHARD_ROWS at a time, each batch stored
    as a shard; return the facts of files too large to hash (never stored: they have no content key)."""
    direct: dict[int, Fact] = {}
    probe = functools.partial(probe_file, salt)
    for start in range(0, len(todo), SHARD_ROWS):
        batch = todo[start : start + SHARD_ROWS]
        # A file over scans.MAX_FILE_BYTES is refused from its size, never read.
        work = decode_seconds(len(batch), sum(sizes[i] for i in batch if sizes[i] <= scans.MAX_FILE_BYTES))
        results = map_files(
            probe, [(str(raw_dir / files[i]), *ids[i]) for i in batch], compute, desc="probe", work_seconds=work
        )
        keep = [n for n, (fact, _) in enumerate(results) if fact.sha256]
        direct.update((batch[n], fact) for n, (fact, _) in enumerate(results) if not fact.sha256)
        if keep:
            store.write([results[n][0] for n in keep], np.stack([results[n][1] for n in keep]))
    return direct
