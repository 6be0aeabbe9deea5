"""What ingest learns from each scan file, learnt once per file content and kept in data/cache/facts.

    found = scan_facts.gather(Path("data/raw"), files, Path("data/cache/facts"), salt, params.compute)
    found.facts[i]               # Fact of files[i]: sha256, header facts or the error, DICOM patient hash
    found.links(rows, 0.99)      # near-duplicate pairs (i, j) among those rows (components.data.near_duplicates)

Per file, ingest needs its sha256, what `scan_info.probe` reads (width, height, channels, bit depth,
modality, or why it is unreadable), the HMAC hash of its DICOM PatientID and its near-duplicate
signature. All of it depends only on the file's bytes and on the reader that opens it
(`scans.decoder`: the extension can decide), so it is stored under that key, once: an append of k
scans decodes those k, and compares their signatures with the others, not every pair again.

The cache folder is a persistent DVC output of the ingest stage, so a clone gets it by `dvc pull`:
- `shard-<n>.npz` holds the facts of up to SHARD_ROWS keys (a JSON table, the signatures and their
  projections). A run adds shards and never rewrites one, so DVC hashes only what is new.
- `shard-<n>.pairs-<threshold>.npz`: the near-duplicate pairs, as keys, between the keys shard n
  added and every key added by it or before it. A new shard costs k x N comparisons; another
  threshold one full search, once.
Both are read with np.load(allow_pickle=False): nothing is pickled. Each shard records `compatibility()`
(FORMAT, the thumbnail size, the Pillow and pydicom versions); a shard made under others is deleted,
as the facts a probe reads now could differ from it.

Patients: a fact holds only the HMAC hash of the DICOM PatientID, with `salt_fingerprint` of the
salt that made it (an HMAC of a constant under that salt, which does not reveal it). A fact made
under another salt is never used: the file is read again and its new fact goes in a new shard.

Which file has which key is the stat index (components/data/stat_index.py: relative path -> size,
mtime_ns, inode, sha256, decoder), machine-local and outside the DVC output. A file whose stat
differs is hashed again, and decoded only if its content is new; a clone therefore hashes every
file once and decodes none. Preprocess reads the same index to skip re-hashing unchanged scans.

A kill at any point leaves the cache usable: every file is written under a temporary name
(`.<name>.<random>.tmp`, which .dvcignore hides from DVC) and renamed; the next run deletes leftovers.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import os
import re
import struct
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components import common
from components.data import folders, near_duplicates, scan_info, scans, stat_index
from components.parallel import decode_seconds, map_files
from components.params import ComputeParams

log = logging.getLogger("medtune.scan_facts")

FORMAT = 1  # the fact and shard layout below; another value makes every stored shard stale
SHARD_ROWS = 4096  # facts per shard: also the files decoded (and their signatures held) at a time
HASH_HERE_BYTES = 256 * 2**20  # files to hash below this many bytes in all are hashed in this process
PATH_MARK = "\x00path\x00"  # where an error message named the file (no path can hold a NUL)
_SHARD = re.compile(r"shard-(\d{6})\.npz")
_FIELDS = ("sha256", "decoder", "size", "width", "height", "channels", "bit_depth", "modality", "error", "patient",
           "salt")


@dataclass(frozen=True, slots=True)
class Fact:
    sha256: str
    decoder: str  # scans.decoder: "dicom" or "image"
    size: int
    width: int | None = None  # None when unreadable
    height: int | None = None
    channels: int | None = None
    bit_depth: int | None = None
    modality: str = ""
    error: str = ""  # why probe refused the file ("" if readable), its path written as PATH_MARK
    patient: str = ""  # HMAC hash of the DICOM PatientID ("" if none)
    salt: str = ""  # salt_fingerprint of the salt that hashed `patient` ("" if none)

    @property
    def key(self) -> str:
        return f"{self.sha256}/{self.decoder}"

    def error_at(self, rel: str) -> str:
        return self.error.replace(PATH_MARK, rel)


def salt_fingerprint(salt: bytes) -> str:
    """Which salt hashed a patient, without revealing it: an HMAC of a constant under the salt."""
    return hmac.new(salt, b"medtune scan_facts salt fingerprint", hashlib.sha256).hexdigest()[:16]


def compatibility() -> dict:
    """What a stored fact depends on besides the file's bytes (a shard with other values is stale)."""
    import PIL
    import pydicom

    return {"format": FORMAT, "thumbnail": scan_info.THUMBNAIL, "pillow": PIL.__version__, "pydicom": pydicom.__version__}


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
    fact = Fact(sha256, decoder, size, info.width, info.height, info.channels, info.bit_depth, info.modality,
                patient=patient, salt=salt_fingerprint(salt) if patient else "")
    return fact, near_duplicates.signature(info.thumbnail, scan_info.THUMBNAIL)


# --------------------------------------------------------------------------- the shards

class Store:
    """The shards of one cache folder: the usable fact of each key, and each shard's first-seen keys."""

    def __init__(self, folder: Path, salt: str):
        self.folder, self.salt = folder, salt
        self.names: list[str] = []  # shard file names, oldest first
        self.fresh: list[list[str]] = []  # per shard, the keys first stored by it
        self.rows: list[np.ndarray] = []  # per shard, the rows of those keys
        self.facts: dict[str, Fact] = {}  # key -> its fact usable under this salt (the newest)
        self.seen: set[str] = set()  # every stored key

    @classmethod
    def open(cls, folder: Path, salt: str) -> Store:
        store = cls(Path(folder), salt)
        store.folder.mkdir(parents=True, exist_ok=True)
        for debris in store.folder.glob(".*.tmp"):  # a run killed while writing
            debris.unlink(missing_ok=True)
        want, dropped = compatibility(), False
        for path in sorted(store.folder.glob("shard-*.npz")):
            if not _SHARD.fullmatch(path.name):
                continue
            try:
                with np.load(path, allow_pickle=False) as z:
                    header, table = json.loads(z["header"].tobytes()), json.loads(z["facts"].tobytes())
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
                log.warning("%s: unreadable (%s); deleted, its scans are read again", path, exc)
                header = None
            if header != want:
                log.info("%s: made under %s, not %s; deleted", path, header, want)
                path.unlink()
                dropped = True
                continue
            store._add(path.name, [Fact(*row) for row in table])
        for pairs in store.folder.glob("shard-*.pairs-*.npz"):
            # Pairs are kept per shard for the keys it was first to store; with a shard gone, which
            # shard stores a key first can change, so every pair list is searched again (once).
            if dropped or pairs.name.split(".pairs-")[0] + ".npz" not in store.names:
                pairs.unlink()
        return store

    def _add(self, name: str, facts: list[Fact]) -> None:
        keys = [f.key for f in facts]
        rows = [row for row, key in enumerate(keys) if key not in self.seen]
        self.seen.update(keys)
        self.names.append(name)
        self.fresh.append([keys[row] for row in rows])
        self.rows.append(np.array(rows, np.int64))
        self.facts.update((key, f) for key, f in zip(keys, facts) if not f.salt or f.salt == self.salt)

    def write(self, facts: list[Fact], signatures: np.ndarray) -> None:
        """Store new facts (and their signatures) as one new shard."""
        number = int(_SHARD.fullmatch(self.names[-1]).group(1)) + 1 if self.names else 0
        name = f"shard-{number:06d}.npz"
        table = json.dumps([[getattr(f, k) for k in _FIELDS] for f in facts], separators=(",", ":"))
        _savez(self.folder / name, header=_text(json.dumps(compatibility())), facts=_text(table),
               signatures=signatures, projections=near_duplicates.project(signatures))
        self._add(name, facts)

    def signatures(self, shard: int, rows: np.ndarray | None = None) -> np.ndarray:
        """(rows, pixels) int32: of the keys `shard` added, those `rows` (default all); only they are read."""
        fresh = self.rows[shard] if rows is None else self.rows[shard][rows]
        return _stored_array(self.folder / self.names[shard], "signatures")[fresh]

    def projections(self, shard: int) -> np.ndarray:
        return _stored_array(self.folder / self.names[shard], "projections")[self.rows[shard]]

    def pairs_path(self, shard: int, threshold: float) -> Path:
        return self.folder / self.names[shard].replace(".npz", f".pairs-{float(threshold)!r}.npz")

    def key_pairs(self, threshold: float) -> set[tuple[str, str]]:
        """Every near-duplicate pair (a, b) of stored keys at `threshold`; (k, k) for a key alike itself."""
        projections: list[np.ndarray] = []
        found: set[tuple[str, str]] = set()
        for shard in range(len(self.names)):
            projections.append(self.projections(shard))
            path = self.pairs_path(shard, threshold)
            try:
                with np.load(path, allow_pickle=False) as z:
                    found.update(zip(z["a"].tolist(), z["b"].tolist()))
                continue
            except FileNotFoundError:
                pass
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
                log.warning("%s: unreadable (%s); searched again", path, exc)
            found.update(self._search(shard, projections, threshold))
        return found

    def _search(self, shard: int, projections: list[np.ndarray], threshold: float) -> list[tuple[str, str]]:
        """Compare the keys `shard` added with every key added by it or before it; store what is alike.
        Of an earlier shard, only the signatures of the rows the filter leaves are read."""
        mine = self.signatures(shard)
        a, b = [], []
        for other in range(shard + 1):
            theirs = mine.__getitem__ if other == shard else functools.partial(self.signatures, other)
            for i, j in near_duplicates.linked(projections[shard], projections[other], mine.__getitem__, theirs,
                                               threshold, same=other == shard, self_pairs=True):
                a += [self.fresh[shard][x] for x in i]
                b += [self.fresh[other][x] for x in j]
        _savez(self.pairs_path(shard, threshold), a=np.array(a, dtype=str), b=np.array(b, dtype=str))
        return list(zip(a, b))


def _stored_array(path: Path, name: str) -> np.ndarray:
    """Array `name` of an .npz written by `_savez` (uncompressed), memory-mapped read-only: indexing it
    reads only the rows asked for, where np.load reads the whole member (16 MB of signatures a shard)."""
    with open(path, "rb") as fh:
        info = zipfile.ZipFile(fh).getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{path}: {name} is compressed; expected np.savez's stored members")
        fh.seek(info.header_offset + 26)  # the local header's name and extra-field lengths
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
        if fortran or dtype.hasobject:
            raise ValueError(f"{path}: {name} is not a plain C-ordered array")
        return np.memmap(path, dtype, "r", offset=fh.tell(), shape=shape)


def _text(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), np.uint8)


def _savez(target: Path, **arrays: np.ndarray) -> None:
    with common.atomic_path(target) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


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


def gather(raw_dir: Path, files: Sequence[str], cache_dir: Path, salt: bytes, compute: ComputeParams,
           listing: folders.Listing | None = None) -> Found:
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
    ids: list[tuple[str, str] | None] = [tuple(index[rel][3:5]) if index.get(rel, [None])[:3] == st else None
                                         for rel, st in zip(files, stats)]
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
    log.info("%s: %d scan(s), %d hashed, %d read (the rest known to %s)", raw_dir, len(files), len(todo),
             len(uncached), cache_dir)
    direct = _probe(root, files, ids, list(uncached.values()), [st[0] for st in stats], store, salt, compute)
    stat_index.write(index_file, listed_ns, {rel: [*st, *ids[i]] for i, (rel, st) in enumerate(zip(files, stats))})
    return Found([direct.get(i) or store.facts[f"{sha}/{decoder}"] for i, (sha, decoder) in enumerate(ids)], store)


def _probe(raw_dir: Path, files: Sequence[str], ids: list, todo: list[int], sizes: Sequence[int], store: Store,
           salt: bytes, compute: ComputeParams) -> dict[int, Fact]:
    """Read the files `todo` (indices; `sizes` in bytes per file), SHARD_ROWS at a time, each batch stored
    as a shard; return the facts of files too large to hash (never stored: they have no content key)."""
    direct: dict[int, Fact] = {}
    probe = functools.partial(probe_file, salt)
    for start in range(0, len(todo), SHARD_ROWS):
        batch = todo[start:start + SHARD_ROWS]
        # A file over scans.MAX_FILE_BYTES is refused from its size, never read.
        work = decode_seconds(len(batch), sum(sizes[i] for i in batch if sizes[i] <= scans.MAX_FILE_BYTES))
        results = map_files(probe, [(str(raw_dir / files[i]), *ids[i]) for i in batch], compute, desc="probe",
                            work_seconds=work)
        keep = [n for n, (fact, _) in enumerate(results) if fact.sha256]
        direct.update((batch[n], fact) for n, (fact, _) in enumerate(results) if not fact.sha256)
        if keep:
            store.write([results[n][0] for n in keep], np.stack([results[n][1] for n in keep]))
    return direct
