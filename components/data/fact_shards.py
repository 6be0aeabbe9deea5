"""The facts cache folder (data/cache/facts): the Fact and near-duplicate signature of each scan content.

    store = fact_shards.Store.open(Path("data/cache/facts"), salt_fingerprint)
    store.facts[f"{sha256}/{decoder}"]      # the Fact stored under that key (usable under this salt)
    store.write(facts, signatures)          # new facts, as one new shard
    store.key_pairs(0.99)                   # every near-duplicate pair of stored keys

components.data.scan_facts reads files and fills it. The folder is a persistent DVC output of the
ingest stage, so a clone gets it by `dvc pull`:
- `shard-<n>.npz` holds the facts of up to scan_facts.SHARD_ROWS keys (a JSON table, the signatures and
  their projections). A run adds shards and never rewrites one, so DVC hashes only what is new.
- `shard-<n>.pairs-<threshold>.npz`: the near-duplicate pairs, as keys, between the keys shard n
  added and every key added by it or before it. A new shard costs k x N comparisons; another
  threshold one full search, once.
Both are read with np.load(allow_pickle=False): nothing is pickled. Each shard records `compatibility()`
(FORMAT, the thumbnail size, the Pillow and pydicom versions); a shard made under others is deleted,
as the facts a probe reads now could differ from it.

A kill at any point leaves the cache usable: every file is written under a temporary name
(`.<name>.<random>.tmp`, which .dvcignore hides from DVC) and renamed; the next run deletes leftovers.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components import common
from components.data import near_duplicates, scan_info

log = logging.getLogger("medtune.scan_facts")  # one name for the facts cache's lines, whichever module logs

FORMAT = 1  # the fact and shard layout below; another value makes every stored shard stale
PATH_MARK = "\x00path\x00"  # where an error message named the file (no path can hold a NUL)
_SHARD = re.compile(r"shard-(\d{6})\.npz")
_FIELDS = (
    "sha256",
    "decoder",
    "size",
    "width",
    "height",
    "channels",
    "bit_depth",
    "modality",
    "error",
    "patient",
    "salt",
)


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
    salt: str = ""  # scan_facts.salt_fingerprint of the salt that hashed `patient` ("" if none)

    @property
    def key(self) -> str:
        return f"{self.sha256}/{self.decoder}"

    def error_at(self, rel: str) -> str:
        return self.error.replace(PATH_MARK, rel)


def compatibility() -> dict:
    """What a stored fact depends on besides the file's bytes (a shard with other values is stale)."""
    import PIL
    import pydicom

    return {
        "format": FORMAT,
        "thumbnail": scan_info.THUMBNAIL,
        "pillow": PIL.__version__,
        "pydicom": pydicom.__version__,
    }


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
        _savez(
            self.folder / name,
            header=_text(json.dumps(compatibility())),
            facts=_text(table),
            signatures=signatures,
            projections=near_duplicates.project(signatures),
        )
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
            for i, j in near_duplicates.linked(
                projections[shard],
                projections[other],
                mine.__getitem__,
                theirs,
                threshold,
                same=other == shard,
                self_pairs=True,
            ):
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
