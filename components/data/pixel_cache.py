"""Prepared pixels stored by content, in append-only shards, so preprocess prepares each scan once.

    store = pixel_cache.open_store(Path("data/cache/pixels"), settings, shape=(1, 64, 64))
    new = store.missing(keys)              # keys (a scan's sha256) not stored yet, in order, once each
    with store.new_shard(new) as block:    # a ShardWriter: rows written in order, straight to the file
        block[0:2] = pixels                # block.append(pixels) the same
    store.get(key)                         # a read-only (C, H, W) view
    store.copy_to(keys, out)               # out[i] = the pixels of keys[i], copied a block at a time
    store.blocks(keys)                     # the same, as (start, block) pairs, for a sequential writer

Layout: `cache_dir/<digest>/settings.json` plus `shard-<id>.npy` (uint8 `(n, C, H, W)`) and
`shard-<id>.keys` (n sha256 lines, row i is the pixels of key i). `<digest>` hashes `settings`,
everything besides a scan's bytes that its pixels depend on (preprocess.cache_settings), so a
change of preprocess.image_size starts a new set. A run adds at most one shard and never rewrites
one: DVC, which tracks the folder as a persistent output of the preprocess stage, then hashes and
stores only that run's shard (file by file; the unchanged ones it knows by their stat).

Memory stays flat in the number of scans: a new shard is written a block at a time to a file
(after the header np.save writes), not through a memory map, and after each block read from a
shard's memory map its pages are dropped from this process (they stay in the page cache): every
page touched through a mapping counts in the process's resident memory until it is unmapped.

A shard counts once its .keys file exists. The .npy is written to a temp file and renamed first,
the .keys file the same way after it, so a kill at any point leaves a complete shard or debris
that the next `open_store` deletes (temp files, an .npy without its .keys, a .keys file whose
count or hashes do not match its .npy). Nothing is pickled (np.load with allow_pickle=False).

Old settings: `drop_other_sets` deletes the sets of other settings once a preprocess succeeded.
Keeping them would make every clone, `dvc pull` and `dvc push` carry every setting ever tried,
without bound; going back to earlier settings costs one full preparation (what any settings
change costs), and the earlier set stays in DVC's cache under the dvc.lock that recorded it.
Growth within a set is bounded by `compact`: past MAX_SHARDS shards, or when more stored rows
belong to removed scans than to scans in use, the live rows are merged into one new shard and
the others deleted (one full rewrite, amortised over many appends).
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from components.common import atomic_path, sha256_bytes, write_json, write_text

log = logging.getLogger("medtune.pixel_cache")

FORMAT = 1  # the shard layout above; part of the digest, so a new layout starts new sets
MAX_SHARDS = 32  # more shards than this in a set: compact (each is a file DVC tracks and checks out)
DIGEST_CHARS = 16
_KEY = re.compile(r"[0-9a-f]{64}")
_SET = re.compile(rf"[0-9a-f]{{{DIGEST_CHARS}}}")


def settings_digest(settings: dict[str, Any]) -> str:
    """The name of the set for `settings` (JSON-able): 16 hex characters of a sha256."""
    text = json.dumps({"format": FORMAT, **settings}, sort_keys=True, separators=(",", ":"))
    return sha256_bytes(text.encode())[:DIGEST_CHARS]


class Store:
    """One settings set of the cache: which key lies in which shard row, the shards memory-mapped."""

    def __init__(self, folder: Path, shape: tuple[int, ...]):
        self.folder, self.shape = folder, tuple(shape)
        self.shards: dict[str, tuple[list[str], np.ndarray]] = {}  # shard id -> (keys, read-only memmap)
        self.where: dict[str, tuple[str, int]] = {}  # key -> (shard id, row)

    def _add(self, shard: str, keys: list[str], images: np.ndarray) -> None:
        self.shards[shard] = (keys, images)
        for row, key in enumerate(keys):
            self.where.setdefault(key, (shard, row))

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys not stored, each once, in first-seen order."""
        return [k for k in dict.fromkeys(keys) if k not in self.where]

    def get(self, key: str) -> np.ndarray:
        shard, row = self.where[key]
        return self.shards[shard][1][row]

    def copy_to(self, keys: Sequence[str], out: np.ndarray, block: int = 4096) -> None:
        """out[i] = the pixels of keys[i]: `block` rows at a time, each shard's share in one indexed copy."""
        for start, pixels in self.blocks(keys, block):
            out[start : start + len(pixels)] = pixels

    def blocks(self, keys: Sequence[str], block: int = 4096) -> Iterator[tuple[int, np.ndarray]]:
        """(start, pixels of keys[start:start + block]) in order: one new array per block."""
        names = list(self.shards)
        number = {name: i for i, name in enumerate(names)}
        where = np.array([(number[s], r) for s, r in map(self.where.__getitem__, keys)], np.int64).reshape(-1, 2)
        for start in range(0, len(where), block):
            part = where[start : start + block]
            out = np.empty((len(part), *self.shape), np.uint8)
            for shard in np.unique(part[:, 0]):
                rows = np.flatnonzero(part[:, 0] == shard)
                images = self.shards[names[shard]][1]
                out[rows] = images[part[rows, 1]]
                _drop_pages(images)
            yield start, out

    @contextlib.contextmanager
    def new_shard(self, keys: list[str]) -> Iterator[ShardWriter]:
        """Yield a ShardWriter for uint8 (len(keys), *shape) rows, written in order; store them as a
        shard if the block exits cleanly with every row written (a failure leaves nothing)."""
        bad = [k for k in keys if not _KEY.fullmatch(k)]
        if bad:
            raise ValueError(f"pixel cache keys must be sha256 hex digests; got {bad[0]!r}")
        if not keys:
            with open(os.devnull, "wb") as fh:
                yield ShardWriter(fh, 0, self.shape)
            return
        shard = shard_name(keys)
        npy = self.folder / f"{shard}.npy"
        with atomic_path(npy) as tmp, open(tmp, "wb") as fh:
            writer = ShardWriter(fh, len(keys), self.shape)
            yield writer
            if writer.rows != len(keys):
                raise ValueError(f"{npy}: {writer.rows} of {len(keys)} rows written; a shard needs every row")
        write_text(self.folder / f"{shard}.keys", "".join(k + "\n" for k in keys))  # the shard now counts
        self._add(shard, list(keys), np.load(npy, mmap_mode="r", allow_pickle=False))

    def compact(self, live: Iterable[str]) -> bool:
        """Merge the `live` keys into one shard and delete the other shards, when there are more than
        MAX_SHARDS or fewer live rows than dead ones. True if it compacted."""
        live = [k for k in dict.fromkeys(live) if k in self.where]
        stored = sum(len(keys) for keys, _ in self.shards.values())
        if len(self.shards) <= MAX_SHARDS and stored <= 2 * len(live):
            return False
        old, live = list(self.shards), sorted(live)
        with self.new_shard(live) as block:
            for _, pixels in self.blocks(live):
                block.append(pixels)
        for shard in old:
            if shard != shard_name(live):
                self.shards.pop(shard)
                _remove_shard(self.folder, shard)
        self.where = {}
        for shard, (keys, images) in self.shards.items():
            self._add(shard, keys, images)
        log.info("%s: compacted %d shard(s) (%d rows) into one of %d", self.folder, len(old), stored, len(live))
        return True


class ShardWriter:
    """The rows of a new shard, written in order to an open file after the .npy header np.save
    writes (the same bytes as np.save of the whole array). `writer[i] = pixels` or
    `writer[i:j] = pixels` (broadcast like numpy's) must start at the next row; `append(pixels)`
    writes (n, *shape) rows."""

    def __init__(self, fh: BinaryIO, n: int, shape: tuple[int, ...]):
        self.fh, self.n, self.shape, self.rows = fh, n, shape, 0
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
            "fortran_order": False,
            "shape": (n, *shape),
        }
        if n:
            np.lib.format.write_array_header_1_0(fh, header)

    def __len__(self) -> int:
        return self.n

    def __setitem__(self, index: int | slice, pixels: Any) -> None:
        start, stop, step = (
            index.indices(self.n)
            if isinstance(index, slice)
            else (index, index + 1, 1)
            if 0 <= index < self.n
            else (index, index, 1)
        )
        if start != self.rows or step != 1 or stop <= start:
            raise IndexError(f"shard rows are written in order: next is row {self.rows} of {self.n}, got {index!r}")
        self.append(np.broadcast_to(np.asarray(pixels, np.uint8), (stop - start, *self.shape)))

    def append(self, pixels: np.ndarray) -> None:
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8 or pixels.shape[1:] != self.shape or self.rows + len(pixels) > self.n:
            raise ValueError(
                f"shard rows {self.rows}..: got {pixels.dtype} {pixels.shape}; expected uint8 "
                f"(<= {self.n - self.rows}, *{self.shape})"
            )
        self.fh.write(np.ascontiguousarray(pixels).tobytes())
        self.rows += len(pixels)


def _drop_pages(images: np.ndarray) -> None:
    """Unmap the pages of a read-only shard map that this process touched (they stay in the page
    cache; the next read maps them again), so reading every shard does not grow its resident memory."""
    base = getattr(images, "_mmap", None)  # np.memmap's mmap.mmap
    if base is not None and hasattr(mmap, "MADV_DONTNEED"):
        base.madvise(mmap.MADV_DONTNEED)


def shard_name(keys: list[str]) -> str:
    """A shard's name follows from its keys (and so its contents, given the set's settings)."""
    return "shard-" + sha256_bytes("\n".join(keys).encode())[:DIGEST_CHARS]


def open_store(cache_dir: Path, settings: dict[str, Any], shape: tuple[int, ...]) -> Store:
    """The set of `settings` under `cache_dir` (created if new), its debris deleted, its shards mapped."""
    folder = Path(cache_dir) / settings_digest(settings)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "settings.json").is_file():
        write_json(folder / "settings.json", {"format": FORMAT, **settings})
    store = Store(folder, shape)
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):  # a temp file of a write that never finished
            _delete(path, "an unfinished write")
        elif path.suffix == ".keys":
            _load_shard(store, path)
    for npy in sorted(folder.glob("*.npy")):
        if npy.stem not in store.shards:
            _delete(npy, "a shard whose keys file was never written")
    return store


def _load_shard(store: Store, keys_path: Path) -> None:
    npy = keys_path.with_suffix(".npy")
    keys = keys_path.read_text(encoding="ascii", errors="replace").split()
    try:
        images = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        why = f"unreadable .npy ({exc})"
    else:
        expected = (len(keys), *store.shape)
        if images.dtype == np.uint8 and images.shape == expected and all(_KEY.fullmatch(k) for k in keys):
            store._add(keys_path.stem, keys, images)
            return
        why = f"{images.dtype} {images.shape} for {len(keys)} keys; expected uint8 {expected} and sha256 keys"
        del images
    _delete(keys_path, why)
    _delete(npy, why)


def _remove_shard(folder: Path, shard: str) -> None:
    # keys first: a kill in between leaves an .npy without keys, which open_store deletes.
    (folder / f"{shard}.keys").unlink(missing_ok=True)
    (folder / f"{shard}.npy").unlink(missing_ok=True)


def _delete(path: Path, why: str) -> None:
    if path.exists():
        log.warning("pixel cache: deleting %s (%s)", path, why)
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def drop_other_sets(cache_dir: Path, keep: Store) -> list[str]:
    """Delete the sets of other settings under `cache_dir` (see the module doc); return their names."""
    dropped = []
    for folder in sorted(Path(cache_dir).iterdir()):
        if folder.is_dir() and _SET.fullmatch(folder.name) and folder != keep.folder:
            shutil.rmtree(folder)
            dropped.append(folder.name)
    if dropped:
        log.info("pixel cache: dropped the set(s) of other settings %s", dropped)
    return dropped
