"""A catalogue of bad or awkward inputs, each built in a temporary folder, with what every reader of
scans must make of it (tests/test_catalogue.py runs them through ingest + validate, import-folders,
ingest-new + retrain --once and predict).

A case adds its files to a tree of good scans (`normal/`, `lesion/`, one patient per image), so the
case is the only thing wrong. CSV cases also write `labels.csv` (the good rows first, theirs after:
their own rows start at line GOOD_ROWS + 2).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["normal", "lesion"]
GOOD_PER_CLASS = 10
GOOD_ROWS = 2 * GOOD_PER_CLASS
FIRST_CASE_LINE = GOOD_ROWS + 2  # labels.csv: header on line 1, then the good rows


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], None]  # adds the case to a folder of good scans (and writes labels.csv if csv)
    named: str  # what every message about the case names (a file, or "line N")
    ingest: str  # "pass" | "warn" (passes, the file listed as skipped) | "fail" (ingest or validate stops)
    imports: str = "n/a"  # "copied" | "skipped" (a warning names it) | "error" | "ignored" (hidden)
    # "quarantine" (retrain --once moves it aside, naming it) | "accept" | "refused" (ingest-new: error)
    batch: str = "quarantine"
    predict: str = "n/a"  # "ok" | "error" (an error row naming it) | "absent" (a folder's non-scan)
    csv: bool = False
    batch_named: str | None = None  # what the batch's quarantine report names, where not `named`


# --------------------------------------------------------------------------- writers


def png(
    path: Path, value: int = 100, size: tuple[int, int] = (24, 24), mode: str = "L", fmt: str = "PNG", **save
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = value if mode in ("L", "1", "I;16", "P") else (value,) * len(mode)
    Image.new(mode, size, colour).save(path, format=fmt, **save)


def noisy_png(path: Path, seed: int) -> None:
    """A distinct good scan (its own bytes and its own look: no duplicate, no near-duplicate)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 24), dtype=np.uint8)).save(path)


def dicom(
    path: Path,
    rows: int = 24,
    cols: int = 24,
    *,
    pixels: bool = True,
    frames: int = 1,
    syntax: str | None = None,
    preamble: bool = True,
    data: bytes | None = None,
    seed: int = 0,
) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.PatientName, ds.PatientID = "Catalogue^Patient", f"CAT-{path.name}"
    ds.Modality, ds.SOPClassUID, ds.SOPInstanceUID = "CT", meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if pixels:
        values = np.random.default_rng(seed).integers(0, 4000, (frames * 24 * 24,), dtype=np.uint16)
        ds.PixelData = data if data is not None else values.tobytes()
        if syntax and syntax != ExplicitVRLittleEndian:
            ds["PixelData"].is_undefined_length = True
    path.parent.mkdir(parents=True, exist_ok=True)
    # Without the file format: no 128-byte preamble and no 'DICM', the dataset straight from byte 0.
    ds.save_as(path, enforce_file_format=preamble)


def good_tree(root: Path, csv: bool = False, seed: int = 0) -> None:
    """GOOD_PER_CLASS distinct scans per class; with csv, labels.csv listing them (path,label)."""
    for k, label in enumerate(CLASSES):
        for i in range(GOOD_PER_CLASS):
            noisy_png(root / label / f"good{i:02d}.png", seed * 1000 + 100 * k + i)
    if csv:
        write_labels(root, [])


def write_labels(
    root: Path,
    extra: list[str],
    header: str = "path,label",
    encoding: str = "utf-8",
    newline: str = "\n",
    good: bool = True,
) -> None:
    lines = [header]
    if good:
        lines += [f"{label}/good{i:02d}.png,{label}" for label in CLASSES for i in range(GOOD_PER_CLASS)]
    (root / "labels.csv").write_bytes(newline.join(lines + extra).encode(encoding) + newline.encode())


def png_bomb(path: Path, side: int = 100_000) -> None:
    """A valid PNG header claiming side x side pixels, with almost no data: a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def sparse(path: Path, size: int, head: bytes = b"") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(size)


def _truncated(root: Path) -> None:
    noisy_png(root / "lesion" / "cut.png", 7)
    data = (root / "lesion" / "cut.png").read_bytes()
    (root / "lesion" / "cut.png").write_bytes(data[: len(data) // 2])


def _outside(root: Path) -> Path:
    """A good scan outside the tree (beside it), for links to point at."""
    target = root.parent / f"{root.name}-outside" / "secret.png"
    noisy_png(target, 4242)
    return target


def _link(root: Path, rel: str, target: Path | str) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, root / rel)


def _climbing_link(root: Path) -> None:
    _outside(root)
    _link(root, "lesion/up.png", Path("../..") / f"{root.name}-outside" / "secret.png")


def _latin1(root: Path) -> None:
    noisy_png(root / "x" / "l\u00e9sion.png", 78)
    write_labels(root, ["x/l\u00e9sion.png,lesion"], encoding="latin-1")


def _bom_crlf(root: Path) -> None:
    write_labels(root, [], newline="\r\n")
    (root / "labels.csv").write_bytes(b"\xef\xbb\xbf" + (root / "labels.csv").read_bytes())


def _one_class(root: Path) -> None:
    write_labels(root, [f"{c}/good{i:02d}.png,normal" for c in CLASSES for i in range(GOOD_PER_CLASS)], good=False)


def _patient_leak(root: Path) -> None:
    """Five patients, each with images in two or three splits."""
    write_labels(
        root,
        [
            f"{c}/good{i:02d}.png,{c},P{i % 5},{('train', 'val', 'test')[i % 3]}"
            for c in CLASSES
            for i in range(GOOD_PER_CLASS)
        ],
        header="path,label,patient_id,split",
        good=False,
    )


# --------------------------------------------------------------------------- the catalogue

FILE_CASES = [
    Case("truncated-png", _truncated, "cut.png", "fail", "copied", "quarantine", "error"),
    Case(
        "zero-bytes-png",
        lambda r: (r / "lesion" / "empty.png").write_bytes(b""),
        "empty.png",
        "fail",
        "copied",
        "quarantine",
        "error",
    ),
    Case(
        "zero-bytes-dcm",
        lambda r: (r / "lesion" / "empty.dcm").write_bytes(b""),
        "empty.dcm",
        "fail",
        "copied",
        "quarantine",
        "error",
    ),
    Case(
        "jpeg-named-png",
        lambda r: png(r / "lesion" / "photo.png", 90, fmt="JPEG"),
        "photo.png",
        "pass",
        "copied",
        "accept",
        "ok",
    ),
    Case(
        "png-named-dcm",
        lambda r: png(r / "lesion" / "image.dcm", 90),
        "image.dcm",
        "fail",
        "copied",
        "quarantine",
        "error",
    ),
    Case(
        "random-bytes-png",
        lambda r: (r / "lesion" / "noise.png").write_bytes(os.urandom(3000)),
        "noise.png",
        "fail",
        "copied",
        "quarantine",
        "error",
    ),
    Case(
        "random-bytes-no-extension",
        lambda r: (r / "lesion" / "blob").write_bytes(b"\x17" + os.urandom(3000)),
        "blob",
        "warn",
        "skipped",
        "quarantine",
        "absent",
    ),
    Case(
        "text-file",
        lambda r: (r / "lesion" / "notes.txt").write_text("see scans"),
        "notes.txt",
        "warn",
        "skipped",
        "quarantine",
        "absent",
    ),
    Case(
        "bmp-image",
        lambda r: png(r / "lesion" / "scan.bmp", 80, fmt="BMP"),
        "scan.bmp",
        "warn",
        "skipped",
        "quarantine",
        "absent",
    ),
    Case(
        "gif-named-png",
        lambda r: png(r / "lesion" / "anim.png", 80, mode="P", fmt="GIF"),
        "anim.png",
        "fail",
        "copied",
        "quarantine",
        "error",
    ),
    Case(
        "dicom-without-pixels",
        lambda r: dicom(r / "lesion" / "report.dcm", pixels=False),
        "report.dcm",
        "fail",
        "copied",
        "quarantine",
        "error",
    ),
    Case(
        "dicom-wrong-size",
        lambda r: dicom(r / "lesion" / "short.dcm", rows=64, cols=64),
        "short.dcm",
        "fail",
        "copied",
        "quarantine",
        "error",
    ),
    Case(
        "dicom-compressed-no-decoder",
        lambda r: dicom(
            r / "lesion" / "j2k.dcm",
            syntax="1.2.840.10008.1.2.4.90",
            data=b"\xfe\xff\x00\xe0\x00\x00\x00\x00\xfe\xff\x00\xe0\x08\x00\x00\x00garbage!"
            b"\xfe\xff\xdd\xe0\x00\x00\x00\x00",
        ),
        "j2k.dcm",
        "fail",
        "copied",
        "quarantine",
        "error",
    ),
    Case(
        "dicom-multi-frame",
        lambda r: dicom(r / "lesion" / "frames.dcm", frames=3),
        "frames.dcm",
        "fail",
        "copied",
        "quarantine",
        "error",
    ),
    Case(
        "dicom-without-preamble",
        lambda r: dicom(r / "lesion" / "raw.dcm", preamble=False, seed=3),
        "raw.dcm",
        "pass",
        "copied",
        "accept",
        "ok",
    ),
    Case(
        "dicom-without-extension",
        lambda r: dicom(r / "lesion" / "1.2.840.99.1", seed=4),
        "1.2.840.99.1",
        "pass",
        "copied",
        "accept",
        "ok",
    ),
    Case(
        "zero-filled-dcm",
        lambda r: sparse(r / "lesion" / "zeros.dcm", 8 * 2**20),
        "zeros.dcm",
        "fail",
        "copied",
        "quarantine",
        "error",
    ),
    Case(
        "huge-dcm",
        lambda r: sparse(r / "lesion" / "huge.dcm", 4 * 2**30, b"\0" * 128 + b"DICM"),
        "huge.dcm",
        "warn",
        "skipped",
        "refused",
        "error",
    ),
    Case(
        "png-decompression-bomb",
        lambda r: png_bomb(r / "lesion" / "bomb.png"),
        "bomb.png",
        "fail",
        "copied",
        "quarantine",
        "error",
    ),
    Case(
        "png-16-bit",
        lambda r: png(r / "lesion" / "deep.png", 40000, mode="I;16"),
        "deep.png",
        "pass",
        "copied",
        "accept",
        "ok",
    ),
    Case(
        "png-rgba",
        lambda r: png(r / "lesion" / "alpha.png", 120, mode="RGBA"),
        "alpha.png",
        "pass",
        "copied",
        "accept",
        "ok",
    ),
    Case(
        "png-palette", lambda r: png(r / "lesion" / "pal.png", 3, mode="P"), "pal.png", "pass", "copied", "accept", "ok"
    ),
    Case(
        "png-one-bit",
        lambda r: png(r / "lesion" / "bits.png", 1, mode="1"),
        "bits.png",
        "fail",
        "copied",
        "quarantine",
        "ok",
    ),
    Case(
        "jpeg-cmyk",
        lambda r: png(r / "lesion" / "print.jpg", 60, mode="CMYK", fmt="JPEG"),
        "print.jpg",
        "pass",
        "copied",
        "accept",
        "ok",
    ),
    Case(
        "jpeg-progressive",
        lambda r: png(r / "lesion" / "prog.jpeg", 70, fmt="JPEG", progressive=True),
        "prog.jpeg",
        "pass",
        "copied",
        "accept",
        "ok",
    ),
    Case(
        "tiny-image",
        lambda r: png(r / "lesion" / "tiny.png", 50, size=(4, 4)),
        "tiny.png",
        "fail",
        "copied",
        "quarantine",
        "ok",
    ),
    Case(
        "extreme-aspect",
        lambda r: png(r / "lesion" / "strip.png", 50, size=(16, 2000)),
        "strip.png",
        "pass",
        "copied",
        "accept",
        "ok",
    ),
    Case(
        "unicode-name",
        lambda r: noisy_png(r / "lesion" / "lésion Ü 片,1.png", 31),
        "lésion Ü 片,1.png",
        "pass",
        "copied",
        "accept",
        "ok",
    ),
    Case(
        "upper-case-extension",
        lambda r: noisy_png(r / "lesion" / "LOUD.PNG", 32),
        "LOUD.PNG",
        "pass",
        "copied",
        "accept",
        "ok",
    ),
    Case(
        "deeply-nested",
        lambda r: noisy_png(r / "lesion" / "a" / "b" / "c" / "deep.png", 33),
        "deep.png",
        "pass",
        "copied",
        "accept",
        "ok",
    ),
    Case(
        "os-files",
        lambda r: [
            (r / "lesion" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1"),
            png(r / "lesion" / "__MACOSX" / "._x.png", 9),
            png(r / "lesion" / ".ipynb_checkpoints" / "x.png", 9),
        ],
        ".DS_Store",
        "pass",
        "ignored",
        "accept",
        "absent",
    ),
    Case(
        "link-inside",
        lambda r: _link(r, "lesion/again.png", Path("good00.png")),
        "again.png",
        "pass",
        "copied",
        "quarantine",
        "ok",
    ),
    Case(
        "link-outside",
        lambda r: _link(r, "lesion/leak.png", _outside(r)),
        "leak.png",
        "fail",
        "skipped",
        "quarantine",
        "error",
    ),
    Case("link-climbing-out", _climbing_link, "up.png", "fail", "skipped", "quarantine", "error"),
    Case(
        "broken-link",
        lambda r: _link(r, "lesion/gone.png", r / "nowhere.png"),
        "gone.png",
        "warn",
        "skipped",
        "quarantine",
        "absent",
    ),
    Case(
        "scan-outside-class-folders",
        lambda r: noisy_png(r / "loose.png", 34),
        "loose.png",
        "fail",
        "error",
        "quarantine",
        "ok",
    ),
    Case(
        "unknown-class-folder",
        lambda r: noisy_png(r / "pneumonia" / "p.png", 35),
        "pneumonia",
        "fail",
        "copied",
        "quarantine",
        "ok",
    ),
    Case(
        "same-bytes-two-labels",
        lambda r: (r / "normal" / "twin.png").write_bytes((r / "lesion" / "good00.png").read_bytes()),
        "twin.png",
        "fail",
        "copied",
        "quarantine",
        "ok",
    ),
]


def _rows(*extra: str, **kw) -> Callable[[Path], None]:
    return lambda root: write_labels(root, list(extra), **kw)


def _with_file(rel: str, *extra: str) -> Callable[[Path], None]:
    def build(root: Path) -> None:
        noisy_png(root / rel, 77)
        write_labels(root, list(extra))

    return build


LINE = f"line {FIRST_CASE_LINE}"
CSV_CASES = [
    Case("csv-unknown-label", _with_file("x/new.png", "x/new.png,pneumonia"), "new.png", "fail", csv=True),
    Case("csv-missing-label", _with_file("x/new.png", "x/new.png,"), "new.png", "fail", csv=True),
    Case(
        "csv-conflicting-labels",
        _with_file("x/new.png", "x/new.png,normal", "x/new.png,lesion"),
        "new.png",
        "fail",
        csv=True,
    ),
    Case("csv-duplicate-row", _rows("normal/good00.png,normal"), "normal/good00.png", "fail", csv=True),
    Case("csv-missing-file", _rows("x/absent.png,lesion"), "absent.png", "fail", csv=True),
    Case("csv-absolute-path", _rows("/etc/hostname,lesion"), LINE, "fail", csv=True),
    Case("csv-climbing-path", _rows("../outside.png,lesion"), LINE, "fail", csv=True),
    Case("csv-windows-drive", _rows("C:\\scans\\x.png,lesion"), LINE, "fail", csv=True),
    Case("csv-no-header", _rows(header="normal/good00.png,normal"), "missing column", "fail", csv=True),
    Case("csv-semicolons", lambda r: write_labels(r, [], header="path;label"), "missing column", "fail", csv=True),
    Case("csv-empty-file", lambda r: (r / "labels.csv").write_bytes(b""), "labels.csv", "fail", csv=True),
    Case("csv-latin-1", _latin1, "not UTF-8", "fail", csv=True),
    Case("csv-bom-and-crlf", _bom_crlf, "labels.csv", "pass", batch="accept", csv=True),
    Case("csv-scan-without-row", _with_file("x/unlisted.png"), "unlisted.png", "fail", csv=True),
    Case("csv-one-class-only", _one_class, "lesion", "fail", batch="accept", csv=True),
    # The catalogue's workspace is folder per class, where a batch cannot carry patients or splits.
    Case("csv-patient-leak", _patient_leak, "in splits", "fail", csv=True, batch_named="column 'patient_id'"),
    Case(
        "csv-bad-split-name",
        _rows("normal/good00.png,normal,training", header="path,label,split", good=False),
        "training",
        "fail",
        csv=True,
    ),
]

CASES = FILE_CASES + CSV_CASES
