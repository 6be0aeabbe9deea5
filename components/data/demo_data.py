"""Synthetic CT-like demo scans, written as DICOM, so the whole pipeline runs without real data.

    medtune demo-data --out data/raw                       # 40 patients x 6 slices, 64 px
    medtune demo-data --out data/raw --batch-name 2024-06  # later: an extra batch of new patients
    medtune demo-data --out data/raw --task regression     # PNGs + labels.csv: target = lesion diameter (mm)

Each synthetic patient has a fixed anatomy (body ellipse, fat rim, organs, spine) that varies a
little from slice to slice, plus noise. Half the patients carry a lesion (a round bright or dark
blob at a patient-specific place) on most of their slices; the others never do. A slice goes to
`OUT/<class>/case<NNN>_<SS>.dcm` with class `classes[1]` when it shows the lesion, else `classes[0]`.

The files carry synthetic identifiers (PatientName "Demo^Patient017", PatientID "DEMO-017", birth
and study dates) so the demo exercises identifier hashing; the file names deliberately do not.
`--task regression` (or data.task: regression) writes `generate_regression`'s scans instead: PNGs
at the top of OUT, each showing one bright round lesion whose diameter in mm is its target, listed in
`OUT/labels.csv` (path,target,patient_id) for data.label_source: csv.

Output is byte-identical for the same arguments: every random draw comes from a numpy generator
seeded with (seed, patient number), UIDs are hashes of the same, and no date comes from the clock.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from components import common
from components.params import Params, load_params

log = logging.getLogger("medtune.demo_data")

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RESCALE_INTERCEPT = -1024.0  # stored value = HU + 1024, as many CT scanners do
LESION_SLICE_PROBABILITY = 0.8  # lesion patients show the lesion on most, not all, slices
REGRESSION_FOV_MM = 160.0  # the regression scans' field of view: 2.5 mm a pixel at 64 px
REGRESSION_DIAMETER_MM = (10.0, 50.0)  # a patient's largest lesion diameter, drawn uniformly


def _uid(*parts: object) -> str:
    """A fixed, valid DICOM UID: the '2.25.' form of a 128-bit hash of the parts."""
    digest = hashlib.sha256("/".join(map(str, ("medtune-demo", *parts))).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    return ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0


def _anatomy(rng: np.random.Generator) -> dict[str, np.ndarray | float]:
    """Per-patient constants; slices only perturb them, so a patient looks like one body."""
    return {
        "body": np.array(
            [
                0.5 + rng.uniform(-0.03, 0.03),
                0.5 + rng.uniform(-0.03, 0.03),
                rng.uniform(0.40, 0.46),
                rng.uniform(0.30, 0.37),
            ]
        ),
        "liver": np.array(
            [rng.uniform(0.30, 0.36), rng.uniform(0.42, 0.50), rng.uniform(0.13, 0.17), rng.uniform(0.11, 0.15)]
        ),
        "liver_hu": rng.uniform(50, 70),
        "kidney_dx": rng.uniform(0.14, 0.18),
        "kidney_hu": rng.uniform(90, 120),  # contrast-enhanced, so visible beside soft tissue
        "spine_r": rng.uniform(0.055, 0.07),
        "texture": rng.uniform(-1, 1, size=(4, 4)),  # low-frequency tissue texture
        "lesion_xy": np.array([rng.uniform(0.38, 0.62), rng.uniform(0.38, 0.58)]),
        "lesion_r": rng.uniform(0.06, 0.09),
        "lesion_hu": rng.choice([-1.0, 1.0]) * rng.uniform(130, 180),
    }


def _slice_hu(rng: np.random.Generator, a: dict, size: int, z: float, lesion: bool) -> np.ndarray:
    """One axial slice in Hounsfield units; z in [0, 1] moves organs slightly along the body."""
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    cx, cy, ax, ay = a["body"] * np.array([1, 1, 1 + 0.03 * np.sin(3 * z), 1 + 0.03 * np.cos(2 * z)])
    img = np.full((size, size), -1000.0)
    img[_ellipse(xx, yy, cx, cy, ax, ay)] = -100.0  # subcutaneous fat rim
    inner = _ellipse(xx, yy, cx, cy, ax * 0.88, ay * 0.86)
    img[inner] = 40.0  # soft tissue
    k = np.arange(4)
    tex = np.einsum(
        "ij,iy,jx->yx",
        a["texture"],
        np.cos(np.pi * k[:, None] * yy[None, :, 0]),
        np.cos(np.pi * k[:, None] * xx[None, 0, :]),
    )
    img[inner] += 6.0 * tex[inner]
    lx, ly, lax, lay = a["liver"] * np.array([1, 1, 1 - 0.2 * z, 1 - 0.1 * z])
    img[_ellipse(xx, yy, lx, ly, lax, lay) & inner] = a["liver_hu"]
    for side in (-1, 1):  # kidneys, posterior, either side of the spine
        img[_ellipse(xx, yy, cx + side * a["kidney_dx"], cy + 0.12, 0.05, 0.07 + 0.01 * z) & inner] = a["kidney_hu"]
    r = a["spine_r"]
    img[_ellipse(xx, yy, cx, cy + ay * 0.62, r, r)] = 700.0  # vertebral body (bone)
    if lesion:
        jx, jy = a["lesion_xy"] + rng.normal(0, 0.02, size=2)
        rad = a["lesion_r"] * rng.uniform(0.85, 1.15)
        dist = np.hypot((xx - jx) / rad, (yy - jy) / (rad * rng.uniform(0.8, 1.2)))
        img += a["lesion_hu"] * np.clip((1.0 - dist) / 0.3, 0.0, 1.0)  # soft-edged blob
    img += rng.normal(0.0, 15.0, size=img.shape)  # quantum noise
    return img


def _dataset(
    pixels_hu: np.ndarray, number: int, slice_idx: int, seed: int, prng: np.random.Generator, implicit: bool
) -> Dataset:
    size = pixels_hu.shape[0]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = _uid(seed, number, slice_idx)
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    # Fixed here, so the bytes do not change with the pydicom version that writes them.
    meta.ImplementationClassUID = _uid("implementation")
    meta.ImplementationVersionName = "MEDTUNE_DEMO"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = _uid(seed, number, "study")
    ds.SeriesInstanceUID = _uid(seed, number, "series")
    ds.FrameOfReferenceUID = _uid(seed, number, "frame")
    ds.Modality = "CT"
    # Synthetic identifiers: the pipeline must hash PatientID and drop everything else.
    ds.PatientName = f"Demo^Patient{number:03d}"
    ds.PatientID = f"DEMO-{number:03d}"
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=int(prng.integers(0, 50 * 365)))
    study = dt.date(2023, 1, 1) + dt.timedelta(days=int(prng.integers(0, 365)))
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = "F" if number % 2 else "M"
    ds.StudyDate = ds.SeriesDate = study.strftime("%Y%m%d")
    ds.StudyTime = "101500"
    ds.StudyDescription = "medtune synthetic demo"
    ds.SeriesNumber = 1
    ds.InstanceNumber = slice_idx + 1
    ds.SliceThickness = 5.0
    ds.SliceLocation = -5.0 * slice_idx
    ds.ImagePositionPatient = [-200.0, -200.0, -5.0 * slice_idx]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [round(400.0 / size, 4)] * 2
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1  # signed int16
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1.0
    ds.RescaleType = "HU"
    ds.WindowCenter = 40.0  # soft-tissue window
    ds.WindowWidth = 400.0
    stored = np.clip(np.rint(pixels_hu - RESCALE_INTERCEPT), -32768, 32767).astype("<i2")
    ds.PixelData = stored.tobytes()
    return ds


def generate(
    out_dir: Path, patients: int, slices: int, size: int, seed: int, classes: list[str], patient_offset: int = 0
) -> int:
    """Write `patients` x `slices` DICOM files under out_dir/<class>/; return the number written.

    Patients are numbered patient_offset+1 .. patient_offset+patients; a patient's images depend
    only on (seed, its number), so a batch with another offset holds new, distinct patients.
    """
    if len(classes) != 2:
        raise ValueError(
            f"demo-data: classes = {classes!r} is invalid; the demo is binary, expected "
            "two names (no lesion, lesion), e.g. data.classes: [normal, lesion]."
        )
    for name, value, low in (("patients", patients, 1), ("slices", slices, 1), ("size", size, 16)):
        if value < low:
            raise ValueError(f"demo-data: --{name} = {value} is invalid; expected an integer >= {low}.")
    out_dir = Path(out_dir)
    counts = dict.fromkeys(classes, 0)
    for number in range(patient_offset + 1, patient_offset + patients + 1):
        rng = np.random.default_rng([seed, number])
        anatomy = _anatomy(rng)
        has_lesion = (number + seed) % 2 == 0  # exactly balanced patients, whatever the count
        prng = np.random.default_rng([seed, number, 1])  # dates: independent of the pixels
        implicit = number % 2 == 1  # a mix of transfer syntaxes, as from different scanners
        for s in range(slices):
            lesion = has_lesion and rng.random() < LESION_SLICE_PROBABILITY
            z = s / max(slices - 1, 1)
            hu = _slice_hu(rng, anatomy, size, z, lesion)
            ds = _dataset(hu, number, s, seed, prng, implicit)
            label = classes[1] if lesion else classes[0]
            with common.atomic_path(out_dir / label / f"case{number:03d}_{s:02d}.dcm") as tmp:
                ds.save_as(tmp, enforce_file_format=True)
            counts[label] += 1
    log.info(
        "wrote %d synthetic DICOM files for %d patients into %s (%s)",
        sum(counts.values()),
        patients,
        out_dir,
        ", ".join(f"{k}: {v}" for k, v in counts.items()),
    )
    return sum(counts.values())


def _regression_scan(rng: np.random.Generator, size: int, diameter_mm: float, centre: np.ndarray) -> np.ndarray:
    """One 8-bit axial slice, REGRESSION_FOV_MM wide: a body ellipse of soft tissue and a bright round
    lesion of `diameter_mm` at `centre` (fractions of the field), with noise. The disc's edge is
    antialiased (its coverage of each pixel), so the drawn size follows the target below a pixel."""
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    img = np.full((size, size), 8.0)
    body = _ellipse(xx, yy, 0.5 + rng.uniform(-0.02, 0.02), 0.5 + rng.uniform(-0.02, 0.02), 0.44, 0.36)
    img[body] = 90.0 + 10.0 * np.sin(2 * np.pi * (xx[body] * rng.uniform(1, 3) + rng.uniform(0, 1)))
    radius_px = diameter_mm / REGRESSION_FOV_MM * size / 2
    dist_px = np.hypot(xx - centre[0], yy - centre[1]) * size
    img += 130.0 * np.clip(radius_px - dist_px + 0.5, 0.0, 1.0)
    img += rng.normal(0.0, 6.0, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def generate_regression(
    out_dir: Path, patients: int, seed: int, size: int = 64, slices: int = 3, patient_offset: int = 0
) -> int:
    """Write `patients` x `slices` PNG scans under out_dir and out_dir/labels.csv
    (`path,target,patient_id`); return the number written. The target of a scan is the diameter in mm
    of the lesion drawn on it (a sphere cut at several heights: each slice shows a smaller disc than
    the patient's largest), to 0.1 mm; the field of view is REGRESSION_FOV_MM at any `size`. Patients
    are numbered like `generate`'s (patient_offset+1 ..) and their scans depend only on (seed, number);
    the same arguments give the same bytes."""
    for name, value, low in (("patients", patients, 1), ("slices", slices, 1), ("size", size, 16)):
        if value < low:
            raise ValueError(f"demo-data: --{name} = {value} is invalid; expected an integer >= {low}.")
    out_dir = Path(out_dir)
    rows = []
    for number in range(patient_offset + 1, patient_offset + patients + 1):
        rng = np.random.default_rng([seed, number, 2])
        largest = rng.uniform(*REGRESSION_DIAMETER_MM)
        centre = np.array([0.5, 0.5]) + rng.uniform(-0.08, 0.08, size=2)
        for s in range(slices):
            height = rng.uniform(0.0, 0.6)  # where the slice cuts the sphere, as a share of its radius
            diameter = round(largest * float(np.sqrt(1.0 - height**2)), 1)
            pixels = _regression_scan(rng, size, diameter, centre + rng.normal(0, 0.01, size=2))
            name = f"case{number:03d}_{s:02d}.png"
            with common.atomic_path(out_dir / name) as tmp:
                Image.fromarray(pixels, mode="L").save(tmp, format="PNG")
            rows.append(f"{name},{diameter!r},REG-{number:03d}")
    _write_labels(out_dir / "labels.csv", rows)
    log.info(
        "wrote %d synthetic PNG scans for %d patients into %s (target: lesion diameter in mm)",
        len(rows),
        patients,
        out_dir,
    )
    return len(rows)


def _write_labels(csv_path: Path, rows: list[str]) -> None:
    """labels.csv with `rows` after the rows it already holds for other files, so a batch written into
    the same folder (--batch-name) adds to the labels instead of replacing them."""
    header = "path,target,patient_id"
    mine = {r.split(",", 1)[0] for r in rows}
    kept = []
    if csv_path.is_file():
        lines = csv_path.read_text(encoding="utf-8").splitlines()
        if lines[:1] != [header]:
            raise common.StageError(f"{csv_path}: header {lines[:1]}; expected {header!r} to add regression scans.")
        kept = [line for line in lines[1:] if line and line.split(",", 1)[0] not in mine]
    common.write_text(csv_path, "\n".join([header, *kept, *rows]) + "\n")


def batch_offset(batch_name: str) -> int:
    """Patient-number offset of a named extra batch: above any base set, stable for the name."""
    h = int(hashlib.sha256(batch_name.encode()).hexdigest()[:8], 16)
    return 1000 * (1 + h % 900)


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("data/raw"), help="output folder (default: data/raw)")
    parser.add_argument("--patients", type=int, default=40, help="synthetic patients (default: 40)")
    parser.add_argument("--slices", type=int, default=6, help="slices per patient (default: 6)")
    parser.add_argument("--size", type=int, default=64, help="image width and height in pixels (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--task",
        choices=["classification", "regression"],
        default=None,
        help="classification: DICOM per class folder; regression: PNGs and labels.csv whose target is the "
        "lesion's diameter in mm (default: data.task)",
    )
    parser.add_argument(
        "--batch-name",
        default=None,
        help="write an extra batch of new patients (ids distinct from the base set), "
        "e.g. to try retraining on new data",
    )


def _run(args: argparse.Namespace) -> None:
    # Class names come from params.yaml when there is one, so the folders match data.classes.
    params = load_params(args.params) if Path(args.params).is_file() else Params()
    regression = (args.task or params.data.task) == "regression"
    offset = 0
    if args.batch_name:
        offset = batch_offset(args.batch_name)
        clash = sorted(args.out.glob(f"case{offset + 1:03d}_*.png" if regression else f"*/case{offset + 1:03d}_*.dcm"))
        if clash:
            raise common.StageError(
                f"demo-data: {clash[0]} already exists; batch {args.batch_name!r} was "
                "written before (or its name collides); pick another --batch-name."
            )
    if regression:
        generate_regression(args.out, args.patients, args.seed, args.size, args.slices, offset)
    else:
        generate(args.out, args.patients, args.slices, args.size, args.seed, list(params.data.classes), offset)


def main(argv: Sequence[str] | None = None) -> int:
    return common.stage_main(__doc__.splitlines()[0], _add_args, _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
