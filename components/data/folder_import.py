"""`medtune import-folders`: a folder tree of scans, one folder per class, copied plus labels.csv for ingest.

    medtune import-folders downloads/chest_xray --out data/raw

The tree has one of two layouts.
- `SRC/<class>/...` (folder per class): every scan under a class folder, at any depth, is copied
  to `OUT/<class>/<path below the class folder>`; labels.csv has `path,label`, so ingest makes
  its own patient-level split.
- `SRC/<split>/<class>/...` or `SRC/<class>/<split>/...` (the official split; split folders spelt
  train/training, val/valid/validation, test/testing, any case): copied to
  `OUT/<class>/<split>/<path below both>`, so names from different splits never collide;
  labels.csv has `path,label,split`.
Files are copied byte for byte (DICOM headers, JPEG data) under their original names. Which files
are scans is decided by `scans.is_candidate`, as in ingest; other files are skipped and counted
in a warning, and names starting with "." or "_" (.DS_Store, __MACOSX) are ignored.

Every file and folder is checked before a single byte is copied; labels.csv is written last.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from components import common
from components.common import SPLITS
from components.data import folders, scans
from components.data.importers import counts, params_hint, refuse_earlier_import

log = logging.getLogger("medtune.importers")

# Top-level folder name (lower case) -> split, for the spellings public datasets use.
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


@dataclass(frozen=True)
class _Copy:
    source: Path  # the file under SRC (only ever read)
    rel: str  # its posix path under OUT, also labels.csv's `path`
    label: str
    split: str | None  # None in the folder-per-class layout: ingest computes the split


@dataclass(frozen=True)
class _Plan:
    copies: list[_Copy]
    classes: list[str]
    has_split: bool
    warnings: list[str]


def _entries(folder: Path) -> tuple[list[Path], list[Path]]:
    """(visible sub-folders, visible other entries) directly in folder, each sorted. A link out of the
    folder is an "other entry" whatever it points at: never entered or opened (_loose_non_scans)."""
    visible = sorted(p for p in folder.iterdir() if not scans.is_hidden(p.name))
    dirs = [p for p in visible if p.is_dir() and not folders.leaves(folder, p)]
    return dirs, [p for p in visible if p not in dirs]


def _split_folders(folder: Path, dirs: list[Path]) -> dict[str, Path] | None:
    """{split: sub-folder} in SPLITS order if every folder in dirs names a split, None if none does."""
    split_of = {d: SPLIT_NAMES.get(d.name.lower()) for d in dirs}
    named = [d.name for d, s in split_of.items() if s]
    if not named:
        return None
    if len(named) < len(dirs):
        others = [d.name for d, s in split_of.items() if not s]
        raise common.StageError(
            f"{folder}: folders {named} are split names but {others} are not; expected either only split "
            f"folders ({'/'.join(SPLIT_NAMES)}, any case) or none."
        )
    by_split: dict[str, Path] = {}
    for d, s in split_of.items():
        if s in by_split:
            raise common.StageError(
                f"{folder}: folders {by_split[s].name!r} and {d.name!r} both mean split {s!r}; "
                "expected one folder per split."
            )
        by_split[s] = d
    return {s: by_split[s] for s in SPLITS if s in by_split}


def _loose_non_scans(folder: Path, files: list[Path], where: str, expected: str) -> list[tuple[Path, str]]:
    """The entries directly in folder to skip, with why; StageError if any scan sits there unlabelled."""
    leaving = [f for f in files if folders.leaves(folder, f)]  # checked first: never opened
    loose = [f.name for f in files if f not in leaving and scans.is_candidate(f)]
    if loose:
        raise common.StageError(
            f"{folder}: {len(loose)} scan file(s) directly in {where} ({loose[:5]}); expected {expected}."
        )
    return [(f, folders.LINK_OUTSIDE if f in leaving else folders.NOT_A_SCAN) for f in files]


IN_CLASS_FOLDERS = "scans only inside class folders, whose name is their label"


def _class_scans(class_dir: Path, src: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(scans, skipped entries with why) under one class folder; links may point anywhere inside src.
    StageError if it holds no scan."""
    listing = folders.list_folder(class_dir, labels_name=None, within=src)
    other = [(class_dir / s.path, s.reason) for s in listing.skipped if s.reason != folders.HIDDEN]
    if not listing.scans:
        why = f" First: {other[0][0].name} is {other[0][1]}." if other else ""
        raise common.StageError(
            f"{class_dir}: class folder holds no scan file ({len(other)} other file(s)); "
            f"expected PNG, JPEG or DICOM files at any depth below it.{why}"
        )
    return [class_dir / rel for rel in listing.scans], other


def _check_classes(src: Path, classes: list[str]) -> None:
    # On case-insensitive file systems (macOS, Windows) OUT/Normal and OUT/normal are one folder.
    lower = [c.lower() for c in classes]
    clash = sorted({c for c in classes if lower.count(c.lower()) > 1})
    if clash:
        raise common.StageError(f"{src}: class folders {clash} differ only in case; expected one spelling per class.")


def _no_class_folders(folder: Path) -> common.StageError:
    return common.StageError(
        f"{folder}: no class folders (hidden ones, starting with '.' or '_', are ignored); "
        "expected one sub-folder per class, named after it."
    )


def _groups(src: Path, dirs: list[Path]) -> tuple[list[tuple[str | None, str, Path]], list[tuple[Path, str]]]:
    """([(split or None, class, folder holding those scans)], non-scan files to skip), for the three layouts."""
    splits = _split_folders(src, dirs)
    if splits is not None:  # SRC/<split>/<class>/...
        groups, skipped = [], []
        for split, folder in splits.items():
            class_dirs, loose = _entries(folder)
            skipped += _loose_non_scans(folder, loose, f"split folder {folder.name!r}", IN_CLASS_FOLDERS)
            if not class_dirs:
                raise _no_class_folders(folder)
            groups += [(split, d.name, d) for d in class_dirs]
        return groups, skipped
    if not dirs:
        raise _no_class_folders(src)
    inner = {d: _entries(d) for d in dirs}
    inner_splits = {d: _split_folders(d, sub) for d, (sub, _) in inner.items()}
    with_splits = [d.name for d, s in inner_splits.items() if s is not None]
    if not with_splits:  # SRC/<class>/...
        return [(None, d.name, d) for d in dirs], []
    without = [d.name for d, s in inner_splits.items() if s is None]
    if without:
        raise common.StageError(
            f"{src}: class folders {with_splits} hold split folders but {without} do not; "
            "expected split folders inside every class folder or inside none."
        )
    groups, skipped = [], []  # SRC/<class>/<split>/...
    for d, splits_in in inner_splits.items():
        skipped += _loose_non_scans(
            d, inner[d][1], f"class folder {d.name!r}", "scans only inside its split folders, whose name is their split"
        )
        groups += [(split, d.name, folder) for split, folder in splits_in.items()]
    return groups, skipped


def _plan(src: Path) -> _Plan:
    """Everything import_folders will copy, checked before a single byte is written."""
    if not src.is_dir():
        raise common.StageError(
            f"{src} {'is not a folder' if src.exists() else 'not found'}; expected a folder "
            "of class folders (SRC/<class>/...), with or without split folders above or inside them."
        )
    dirs, files = _entries(src)
    skipped = _loose_non_scans(src, files, "the source folder", IN_CLASS_FOLDERS)
    groups, more = _groups(src, dirs)
    skipped += more
    copies = []
    for split, label, folder in groups:
        found, other = _class_scans(folder, src)
        skipped += other
        prefix = f"{label}/{split}" if split is not None else label
        copies += [_Copy(f, f"{prefix}/{f.relative_to(folder).as_posix()}", label, split) for f in found]
    classes = sorted({label for _, label, _ in groups})
    _check_classes(src, classes)
    return _Plan(copies, classes, groups[0][0] is not None, _warnings(src, groups, classes, skipped))


def _warnings(
    src: Path, groups: list[tuple[str | None, str, Path]], classes: list[str], skipped: list[tuple[Path, str]]
) -> list[str]:
    """What the user should know but that does not stop the import: gaps in the splits, skipped files."""
    out = []
    per_split = {split: {label for s, label, _ in groups if s == split} for split, _, _ in groups}
    if None not in per_split:
        absent = [s for s in SPLITS if s not in per_split]
        if absent:
            out.append(
                f"{src}: no folder for split(s) {absent}; labels.csv will have no rows there and the "
                "validate stage fails on an empty split. Add the folder(s), or edit labels.csv."
            )
        out += [
            f"{src}: split {s!r} has no folder for class(es) {missing}, so it has no image of them."
            for s in SPLITS
            if s in per_split and (missing := sorted(set(classes) - per_split[s]))
        ]
    if skipped:
        shown = "; ".join(f"{f.relative_to(src).as_posix()} ({why})" for f, why in skipped[:5])
        out.append(
            f"{src}: skipped {len(skipped)} file(s) that are not scans: {shown}{' ...' if len(skipped) > 5 else ''}."
        )
    return out


def _check_out(src: Path, out_dir: Path) -> None:
    refuse_earlier_import(out_dir)
    a, b = src.resolve(), out_dir.resolve()
    # OUT inside SRC would write into SRC; SRC inside OUT would make ingest read the originals too.
    if a == b or a in b.parents or b in a.parents:
        raise common.StageError(
            f"--out {out_dir} and source {src} overlap; expected two separate folders (the source is only read)."
        )


def import_folders(src: Path, out_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """Copy the scans of a class-folder tree to out_dir and write out_dir/labels.csv; return (table, classes)."""
    src, out_dir = Path(src), Path(out_dir)
    plan = _plan(src)
    _check_out(src, out_dir)
    for warning in plan.warnings:
        log.warning(warning)
    for c in plan.copies:
        with common.atomic_path(out_dir / c.rel) as tmp:
            shutil.copy2(c.source, tmp)  # bytes unchanged (DICOM headers, JPEG data), mtime kept
    columns = ["path", "label", "split"] if plan.has_split else ["path", "label"]
    table = pd.DataFrame([{"path": c.rel, "label": c.label, "split": c.split} for c in plan.copies], columns=columns)
    common.write_text(out_dir / "labels.csv", table.to_csv(index=False, lineterminator="\n"))
    return table, plan.classes


def _add_folder_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src",
        type=Path,
        help="folder of class folders (SRC/<class>/...), optionally with split folders above or inside "
        "them (SRC/<split>/<class>/... or SRC/<class>/<split>/...); only read",
    )
    parser.add_argument("--out", type=Path, default=Path("data/raw"), help="output folder (default: data/raw)")


def _run_folders(args: argparse.Namespace) -> None:
    table, names = import_folders(args.src, args.out)
    print(f"copied {len(table)} scan files to {args.out} and wrote {args.out / 'labels.csv'} ({counts(table)})")
    if "split" not in table.columns:
        print(
            "No split folders: ingest makes a patient-level split. Patients come from DICOM PatientID or, "
            "for PNG/JPEG, from data.patient_pattern (a regex over the file name); without either, every "
            "image is its own patient."
        )
    print(params_hint(args.out, names))


def main_folders(argv: Sequence[str] | None = None) -> int:
    """`medtune import-folders`."""
    return common.stage_main(
        "Importer: copy a folder-per-class tree (optionally with split folders above or inside it) plus "
        "labels.csv for ingest.",
        _add_folder_args,
        _run_folders,
        argv,
        prog="medtune import-folders",
        params_flag=False,
    )
