"""What one scan is, read by decoding it: its header facts (ScanInfo) and a small grey thumbnail.

    from components.data.scan_info import probe
    info = probe(Path("data/raw/lesion/scan01.dcm"))      # ScanInfo, or raises scans.ScanError

Ingest records these once per file content (components.data.scan_facts); the thumbnail is what the
near-duplicate search compares (components.data.near_duplicates). A file is opened by the same readers
that decode it for the model (components.data.scans), so a ScanInfo means the file is readable.
Error messages name the file and the reason and never contain header values; the raw PatientID is
only handed to the caller, which hashes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from components.data import scans


@dataclass(frozen=True)
class ScanInfo:
    width: int
    height: int
    channels: int
    bit_depth: int
    modality: str  # DICOM Modality, or "PNG" / "JPEG"
    patient_id: str | None  # raw DICOM PatientID: the caller hashes it; never log or store it
    is_dicom: bool
    # What the scan looks like, small: THUMBNAIL x THUMBNAIL float32 grey in the file's own units
    # (for components.data.near_duplicates), taken from the pixels probe decodes anyway.
    thumbnail: np.ndarray | None = field(default=None, compare=False, repr=False)


THUMBNAIL = 32


def probe(path: Path) -> ScanInfo:
    """Header facts of one scan; decodes the pixels too, so a ScanInfo means 'readable'."""
    path = Path(path)
    scans.check_size(path)
    return _dicom_info(path) if scans.decoder(path) == "dicom" else _pil_info(path)


def _thumbnail(grey: Image.Image | np.ndarray) -> np.ndarray | None:
    """ScanInfo.thumbnail of a decoded image: a grey PIL image, or a (H, W) grey / (H, W, >= 3)
    colour array (averaged to grey); None for other shapes (e.g. multi-frame)."""
    if isinstance(grey, np.ndarray):
        if grey.ndim == 3 and grey.shape[-1] >= 3:
            grey = grey[..., :3].mean(axis=-1)
        if grey.ndim != 2:
            return None
        grey = Image.fromarray(np.ascontiguousarray(grey, dtype=np.float32))
    # reducing_gap: a fast box reduction first, then bilinear (as preprocess resizes).
    return np.asarray(grey.resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BILINEAR, reducing_gap=2.0), np.float32)


def _dicom_info(path: Path) -> ScanInfo:
    ds, pixels = scans.read_dicom(path)
    patient = str(ds.get("PatientID", "") or "").strip() or None
    channels = int(ds.get("SamplesPerPixel", 1) or 1)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
        channels = 3
    bits = int(ds.get("BitsStored", 0) or ds.get("BitsAllocated", 0) or pixels.dtype.itemsize * 8)
    modality = str(ds.get("Modality", "") or "").strip() or "OT"  # OT = "other" in DICOM terms
    return ScanInfo(
        width=int(pixels.shape[1]),
        height=int(pixels.shape[0]),
        channels=channels,
        bit_depth=bits,
        modality=modality,
        patient_id=patient,
        is_dicom=True,
        thumbnail=_thumbnail(pixels),
    )


def _pil_info(path: Path) -> ScanInfo:
    img = scans.open_pil(path)
    mode = img.mode
    channels = 1 if mode in scans.HIGH_DEPTH_MODES | {"L", "LA", "1"} else 3
    bits = 16 if mode in scans.HIGH_DEPTH_MODES else 1 if mode == "1" else 8
    grey = img.convert("F" if mode in scans.HIGH_DEPTH_MODES else "L")
    return ScanInfo(
        width=img.width,
        height=img.height,
        channels=channels,
        bit_depth=bits,
        modality=img.format,
        patient_id=None,
        is_dicom=False,
        thumbnail=_thumbnail(grey),
    )
