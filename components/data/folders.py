"""What a folder of scans holds, and the one rule for paths that point into it.

    from components.data.folders import list_folder, path_inside
    listing = list_folder(Path("data/raw"))      # .scans: sorted relative paths; .skipped: (path, reason)
    target = path_inside(Path("data/raw"), "lesion/a.png", where="labels.csv line 3")

Ingest, `import-folders`, the retrain inbox and `predict` all read folders through `list_folder`,
so a file is a scan, or skipped for a stated reason, in the same way everywhere; nothing is left
out without a word. The rules:
- Hidden entries (names starting with "." or "_": .git, .DS_Store, .ipynb_checkpoints, __MACOSX)
  are tool or archive state, never scans; a hidden folder is listed once and not searched.
- A symbolic link is followed only when its target resolves inside the folder being read (a link
  between two class folders is fine). A link that leaves the folder is never opened or copied: it
  could make a system file or another patient's data look like a scan. Broken links and links to
  folders are skipped too (folder links are never entered; their files are not ours).
- A file is a scan when `scans.is_candidate` says so (by extension, else by its first bytes);
  anything else is skipped as "not a scan", and so is a file too large to be one (from its size
  alone: copying or hashing a 4 GiB file named .dcm would take minutes).
- The labels file of the folder (labels.csv) is neither a scan nor skipped.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from components.common import StageError
from components.data import scans

HIDDEN = "hidden (name starts with '.' or '_'): tool or archive state, not searched"
LINK_OUTSIDE = "symbolic link to a target outside the folder: never opened or copied"
LINK_BROKEN = "broken symbolic link"
LINK_FOLDER = "symbolic link to a folder: not followed"
NOT_A_SCAN = "not a scan (expected PNG, JPEG or DICOM)"
TOO_LARGE = (
    f"larger than {scans.MAX_FILE_BYTES // 2**20} MiB (scans.MAX_FILE_BYTES): not a single 2-D image, never read"
)
# Entries a reader must not pass over quietly: predict gives each an error row.
REFUSED = (LINK_OUTSIDE, TOO_LARGE)


@dataclass(frozen=True)
class Skipped:
    path: str  # posix, relative to the folder read
    reason: str


@dataclass(frozen=True)
class Listing:
    scans: list[str] = field(default_factory=list)  # posix, relative to the folder, sorted
    skipped: list[Skipped] = field(default_factory=list)  # sorted by path
    # Per scan, (st_size, st_mtime_ns, st_ino) of the stat the listing made (through links), and the
    # clock before it began: ingest's stat index takes them from here instead of stat'ing each file again.
    stats: dict[str, tuple[int, int, int]] = field(default_factory=dict, compare=False, repr=False)
    started_ns: int = 0

    def with_reason(self, reason: str) -> list[str]:
        return [s.path for s in self.skipped if s.reason == reason]


def leaves(folder: Path, path: Path) -> bool:
    """Does `path` (under `folder`) resolve, through links at any level, to a place outside `folder`?"""
    return not _within(Path(os.path.realpath(folder)), Path(os.path.realpath(path)))


def _within(root: Path, target: Path) -> bool:
    return target == root or root in target.parents


def _classify(fence: Path, entry: os.DirEntry, labels_name: str | None, rel: str) -> str | None:
    """None for a scan, "" for the labels file, else the reason the file is skipped. The DirEntry keeps
    what the listing already knows (is it a link, its stat), so a plain file costs one stat."""
    if entry.is_symlink():
        path = Path(entry.path)
        if leaves(fence, path):
            return LINK_OUTSIDE
        if not path.exists():
            return LINK_BROKEN
        if path.is_dir():
            return LINK_FOLDER
    if labels_name is not None and rel == labels_name:
        return ""
    if entry.stat().st_size > scans.MAX_FILE_BYTES:  # before is_candidate reads its first bytes
        return TOO_LARGE
    return None if _is_scan(entry) else NOT_A_SCAN


def _is_scan(entry: os.DirEntry) -> bool:
    """scans.is_candidate's answer, read off the DirEntry (no Path, no second stat) for a plain file named
    like a scan, which is nearly every file of a raw folder; any other file is asked of is_candidate."""
    suffix = os.path.splitext(entry.name)[1].lower()
    if (
        not entry.is_symlink()
        and not entry.name.startswith(".")
        and (suffix in scans.PIL_SUFFIXES or suffix in scans.DICOM_SUFFIXES)
    ):
        return entry.is_file()
    return scans.is_candidate(Path(entry.path))


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links: a link to a folder is listed with the folders, as os.walk does
    except OSError:
        return False


def _entries(folder: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError:  # unreadable or gone: os.walk's default, nothing listed
        return []


def list_folder(
    folder: str | Path, labels_name: str | None = "labels.csv", within: str | Path | None = None
) -> Listing:
    """Every entry under `folder`: the scans, and what was skipped with its reason (see module doc).

    `labels_name` is the folder's labels file, relative to it (neither scan nor skipped). `within`
    is the folder links must stay in, when that is larger than `folder` (import-folders reads one
    class folder of a source tree at a time); default `folder` itself."""
    root = Path(folder)
    fence = Path(within) if within is not None else root
    found, skipped, stats, started_ns = [], [], {}, time.time_ns()
    if leaves(fence, root):  # a class folder that is itself a link out of the tree
        return Listing([], [Skipped(".", LINK_OUTSIDE)])
    # os.scandir, not os.walk + pathlib: each DirEntry carries its type (and caches its stat), so a
    # scan costs one stat call and no Path objects; at 20,000 files that is most of the listing time.
    todo = [(os.fspath(root), "")]
    while todo:
        here, prefix = todo.pop()
        for entry in _entries(here):
            name, rel = entry.name, prefix + entry.name
            if _is_dir(entry):
                if scans.is_hidden(name):
                    skipped.append(Skipped(rel, HIDDEN))
                elif entry.is_symlink():  # a folder link is never entered
                    skipped.append(Skipped(rel, LINK_OUTSIDE if leaves(fence, Path(entry.path)) else LINK_FOLDER))
                else:
                    todo.append((entry.path, rel + "/"))
                continue
            reason = HIDDEN if scans.is_hidden(name) else _classify(fence, entry, labels_name, rel)
            if reason is None:
                found.append(rel)
                st = entry.stat()  # cached by the DirEntry: _classify asked it for the size
                stats[rel] = (st.st_size, st.st_mtime_ns, st.st_ino)
            elif reason:
                skipped.append(Skipped(rel, reason))
    return Listing(sorted(found), sorted(skipped, key=lambda s: s.path), stats, started_ns)


def summary(listing: Listing, limit: int = 5) -> str:
    """'3 skipped: a.txt (not a scan ...); ...' for a log line; "" when nothing was skipped."""
    if not listing.skipped:
        return ""
    shown = "; ".join(f"{s.path} ({s.reason})" for s in listing.skipped[:limit])
    more = f"; ... and {len(listing.skipped) - limit} more" if len(listing.skipped) > limit else ""
    return f"{len(listing.skipped)} entr{'y' if len(listing.skipped) == 1 else 'ies'} skipped: {shown}{more}"


def check_relative(rel: str, where: str) -> str:
    """`rel` as a clean posix path relative to its folder; ValueError naming `where` and the value for an
    absolute path, a drive, or a '..' that climbs out (labels.csv rows may only point into the folder)."""
    text = rel.replace("\\", "/").strip()
    posix = PurePosixPath(text)
    if not text or posix.is_absolute() or PureWindowsPath(rel).drive:
        raise ValueError(
            f"{where}: path {rel!r} is {'empty' if not text else 'absolute'}; expected a path "
            "relative to the folder (e.g. lesion/scan01.dcm)."
        )
    depth = 0
    for part in posix.parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            raise ValueError(f"{where}: path {rel!r} climbs out of the folder with '..'; expected a path inside it.")
    return os.path.normpath(text).replace(os.sep, "/")


def path_inside(folder: Path, rel: str, where: str) -> Path:
    """folder / rel after `check_relative`, refusing a link that resolves outside the folder (ValueError)."""
    target = Path(folder) / check_relative(rel, where)
    if leaves(Path(folder), target):
        raise ValueError(
            f"{where}: path {rel!r} leads through a symbolic link to outside the folder; expected a file inside it."
        )
    return target


def refuse_links_out(folder: str | Path) -> None:
    """StageError naming the links out of `folder`. Call it before `dvc add folder`: DVC replaces a
    link with a copy of its target, after which no reader can tell the file came from outside."""
    links = list_folder(folder, labels_name=None).with_reason(LINK_OUTSIDE)
    if links:
        raise StageError(
            f"{folder}: {len(links)} symbolic link(s) to outside the folder ({links[:5]}); `dvc add` "
            "would store a copy of each target. Remove them, or copy the files in."
        )
