"""Which file of a raw folder holds which content, known from its stat: the machine-local stat index.

    index = stat_index.read(stat_index.index_path(facts_dir, raw_dir))   # rel -> [size, mtime_ns, inode, sha256, decoder]
    known = stat_index.known_hashes(raw_dir, rels, facts_dir)             # rel -> sha256, for unchanged files

Ingest (components/data/scan_facts.py) writes it each run: per scan, its (size, mtime_ns, inode) and the
sha256 and decoder it found. A file whose stat still matches its entry has that content and is not
read again; one whose stat differs is hashed again. Preprocess checks the sha256 of every scan
against the manifest (a file changed after ingest must not be prepared unreviewed) through
`known_hashes`, so it too reads only the files ingest did not see as they are now.

Inodes and mtimes differ in every clone, so the index is no part of any DVC output: it lies in
`.dvc/tmp/` of the DVC project that holds the facts cache (DVC's machine-local scratch space,
ignored by git, never pushed), or beside the cache folder outside a DVC project; one file per pair
of (raw folder, facts cache). A fresh clone therefore hashes every file once. An entry whose file
changed within RACY_NS of the listing is not trusted: a same-size rewrite inside one tick of the
file system's clock leaves the stat as it was (git's "racy" rule).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from components import common

FORMAT = 1  # the index layout below; another value makes every stored index stale (all files hashed once)
RACY_NS = 2_000_000_000
INDEX_DIR = "medtune-scan-stats"


def facts_dir(manifest_dir: Path) -> Path:
    """Ingest's facts cache beside the manifest it writes (data/manifest.csv -> data/cache/facts)."""
    return Path(manifest_dir) / "cache" / "facts"


def index_path(cache_dir: Path, raw_dir: Path) -> Path:
    """Where the stat index of (raw_dir, facts cache_dir) lives (module doc)."""
    cache = Path(os.path.realpath(cache_dir))
    name = common.sha256_bytes(f"{os.path.realpath(raw_dir)}\n{cache}".encode())[:16] + ".json"
    for folder in cache.parents:
        if (folder / ".dvc").is_dir():
            return folder / ".dvc" / "tmp" / INDEX_DIR / name
    return cache.parent / f".{cache.name}-stats" / name


def stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def read(path: Path) -> dict[str, list]:
    """rel -> [size, mtime_ns, inode, sha256, decoder], the trusted entries only; {} if absent or unreadable."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        if doc.get("format") != FORMAT:
            return {}
        return {rel: e for rel, e in doc["files"].items() if e[1] < doc["listed_ns"] - RACY_NS}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return {}


def write(path: Path, listed_ns: int, files: dict[str, list]) -> None:
    """Store the entries (rel -> [size, mtime_ns, inode, sha256, decoder]) of a listing made at listed_ns."""
    # One line, no indent: it is rewritten on every run and read by two stages, never by a person.
    common.write_text(
        path, json.dumps({"format": FORMAT, "listed_ns": listed_ns, "files": files}, separators=(",", ":"))
    )


def known_hashes(raw_dir: Path, rels: Iterable[str], cache_dir: Path) -> dict[str, str]:
    """rel -> sha256 of the files among `rels` (relative to raw_dir) whose stat still matches their trusted
    entry in the index of (raw_dir, cache_dir); files not in it, changed since, or gone are left out."""
    index = read(index_path(cache_dir, raw_dir))
    if not index:
        return {}
    root, out = os.fspath(raw_dir), {}
    for rel in rels:
        entry = index.get(rel)
        if entry is None or not entry[3]:
            continue
        try:
            st = os.stat(os.path.join(root, rel))
        except OSError:
            continue
        if stat_key(st) == entry[:3]:
            out[rel] = entry[3]
    return out
