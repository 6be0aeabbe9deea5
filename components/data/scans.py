"""Decode one scan (DICOM, PNG or JPEG) into display-ready uint8 pixels.

The single place that turns a file into pixels, shared by ingest (components.data.scan_info, whose
probe opens a file with read_dicom / open_pil), preprocess and predict (prepare_image), so training
and serving see exactly the same image:

    from components.data.scans import is_candidate, prepare_image
    x = prepare_image(path, image_size=64, channels=1, window="header")   # uint8 (1, 64, 64)

Decisions (each one is a choice a reader should be able to find):
- DICOM: pydicom, `force=True` so files without the 128-byte preamble read too. Rescale
  slope/intercept (modality LUT) first, then a *linear* window: [center - width/2,
  center + width/2] maps to [0, 255] and is clipped outside. `window="header"` takes the first
  WindowCenter/WindowWidth value and falls back to min-max when absent or invalid; VOI LUT
  sequences and sigmoid VOI functions are ignored. MONOCHROME1 is inverted after windowing.
  Colour DICOM (RGB, YBR converted by pydicom, PALETTE COLOR) is scaled by its stored bit depth.
- PNG/JPEG: Pillow with the EXIF orientation applied. 8-bit images are used as they are; 16-bit
  greyscale PNGs carry raw detector values, so they get the same window as a DICOM without a
  window header ("header" -> min-max per image, "minmax", or [center, width] in raw units).
  Alpha is composited onto black.
- channels=1 is luminance (Pillow's ITU-R 601 "L" conversion); channels=3 is RGB, grey replicated.
- Resize: Pillow bilinear (antialiased when shrinking, reducing_gap=3.0) straight to a square;
  the aspect ratio is NOT preserved (as in MedMNIST). A constant image windows to all zeros.

Error messages name the file and the reason and never contain header values such as the
patient's name or id.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger("medtune.scans")

PIL_SUFFIXES = {".png", ".jpg", ".jpeg"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
# "." is tool or OS state (.git, .dvc, .DS_Store, .ipynb_checkpoints); "_" is archive debris (__MACOSX).
HIDDEN_PREFIXES = (".", "_")
# Files that sit beside scans but are never scans (the labels file, DVC pointers, notes).
NEVER_SCANS = {".csv", ".dvc", ".txt", ".md", ".json", ".yaml", ".yml", ".xml", ".html", ".py", ".log"}
RESIZE_METHOD = "bilinear (Pillow, antialiased, reducing_gap=3.0), direct to square: aspect ratio not preserved"
_REDUCING_GAP = 3.0
_DECODER_HINT = (
    "install a pydicom decoder plugin, e.g. `pip install pylibjpeg pylibjpeg-libjpeg "
    "pylibjpeg-openjpeg` (or `pip install python-gdcm`), or convert the files to an "
    "uncompressed transfer syntax"
)


class ScanError(Exception):
    """The file is unreadable or unsupported; the message says why (never patient identifiers)."""


# --------------------------------------------------------------------------- detection

# No single 2-D image within validate.max_size (8192 px: 128 MiB at 16 bits, 192 MiB in 8-bit RGB)
# comes near this, so a larger file is refused from its size alone, before a byte is read: hashing
# or parsing a 4 GiB file named .dcm would take minutes (and a zero-filled one sends pydicom through
# every zero tag). Hashing a file just under it takes about 0.4 s here.
MAX_FILE_BYTES = 256 * 2**20
# A raw DICOM dataset without the 128-byte preamble starts with its lowest tag, little-endian:
# the file meta group or one of the groups every image has. Text and zero-filled files never do.
_DATASET_GROUPS = (b"\x02\x00", b"\x08\x00", b"\x10\x00", b"\x18\x00", b"\x20\x00", b"\x28\x00")


def _sniff(path: Path) -> str | None:
    """ "dicom", "png" or "jpeg" from the first bytes of the file; None if none of them (or unreadable)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return None
    if (len(head) >= 132 and head[128:132] == b"DICM") or (
        len(head) >= 8 and head[:2] in _DATASET_GROUPS and head[3:4] == b"\x00"
    ):
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    return None


def _has_dicom_signature(path: Path) -> bool:
    """'DICM' at byte 128 (Part 10 file), or a raw dataset starting with a known group's tag."""
    return _sniff(path) == "dicom"


def check_size(path: Path) -> None:
    """ScanError for a missing file, an empty one, or one over MAX_FILE_BYTES (from stat alone)."""
    if not path.is_file():
        raise ScanError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise ScanError(f"{path}: empty file (0 bytes); expected a PNG, JPEG or DICOM image")
    if size > MAX_FILE_BYTES:
        raise ScanError(
            f"{path}: file is {size / 2**20:,.0f} MiB; expected a single 2-D image of at most "
            f"{MAX_FILE_BYTES // 2**20} MiB (scans.MAX_FILE_BYTES), so it is not read"
        )


def is_hidden(name: str) -> bool:
    return name.startswith(HIDDEN_PREFIXES)


def is_candidate(path: Path) -> bool:
    """Is this file a scan to ingest? PNG/JPEG/DICOM by extension, other files by DICOM signature."""
    path = Path(path)
    name = path.name
    if name.startswith(".") or name.lower() == "labels.csv" or not path.is_file():
        return False
    suffix = path.suffix.lower()
    if suffix in PIL_SUFFIXES or suffix in DICOM_SUFFIXES:
        return True
    if suffix in NEVER_SCANS:
        return False
    # No extension, or one like "1.2.840.113619.2.1" (files named by their SOP Instance UID), or a
    # JPEG saved without one: what the first bytes say.
    return _sniff(path) is not None


def _is_dicom(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    if suffix in PIL_SUFFIXES:
        return False
    return _sniff(path) == "dicom"


def decoder(path: Path) -> str:
    """ "dicom" or "image": the reader scan_info.probe and load_pixels use for this file (by its extension,
    else by its first bytes). The same bytes under another extension may read differently, so facts
    cached by content (components.data.scan_facts) are keyed by both."""
    return "dicom" if _is_dicom(Path(path)) else "image"


# --------------------------------------------------------------------------- DICOM


def read_dicom(path: Path):
    """Return (dataset, pixel array) or raise ScanError naming the reason."""
    if not _has_dicom_signature(path):
        # force=True below would otherwise read any bytes as tags: a zero-filled file is millions
        # of empty (0000,0000) elements and takes minutes.
        raise ScanError(
            f"{path}: not a DICOM file (no 'DICM' marker at byte 128 and no dataset tag at the start); "
            "expected a DICOM image"
        )
    with warnings.catch_warnings():  # they may quote header values (see _decode_dicom)
        warnings.simplefilter("ignore")
        return _decode_dicom(path)


def _decode_dicom(path: Path):
    import pydicom
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    # pydicom logs a failed decode with a full traceback, and its warnings quote header values (a
    # patient's name among them); every failure reaches the user as one ScanError naming the file.
    # Set here, after the import: pydicom sets its logger's level when it is first imported.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)

    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # pydicom raises many types on garbage; all mean "not readable"
        raise ScanError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    if "PixelData" not in ds:
        raise ScanError(f"{path}: DICOM file has no pixel data (not an image, e.g. a report); expected an image")
    meta = ds.file_meta
    if "TransferSyntaxUID" not in meta:
        # Files without a meta header: the syntax is the one pydicom detected while reading.
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    tsyntax = meta.TransferSyntaxUID
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        if tsyntax.is_compressed:
            raise ScanError(
                f"{path}: cannot decode pixel data in transfer syntax '{tsyntax.name}' ({tsyntax}); "
                f"{_DECODER_HINT}. Reason: {type(exc).__name__}: {exc}"
            ) from None
        raise ScanError(f"{path}: cannot decode DICOM pixel data ({type(exc).__name__}: {exc})") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ScanError(f"{path}: multi-frame DICOM ({frames} frames); expected a single 2-D image")
    return ds, pixels


def _first(value) -> float:
    """WindowCenter/WindowWidth may be multi-valued; the first value is the primary window."""
    from pydicom.multival import MultiValue

    if isinstance(value, (MultiValue, list, tuple)):
        value = value[0]
    return float(value)


def _window_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:  # constant image under min-max: nothing to show
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float64) - lo) / (hi - lo)
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def _apply_window(path: Path, values: np.ndarray, window, header: tuple[float, float] | None) -> np.ndarray:
    """Linear window -> uint8. `header` is (center, width) from the file, if it has one."""
    if isinstance(window, (list, tuple)):
        center, width = float(window[0]), float(window[1])
    elif window == "header" and header is not None and header[1] > 0:
        center, width = header
    elif window in ("header", "minmax"):
        if window == "header" and header is not None:
            log.warning("%s: WindowWidth %s is not > 0; using min-max instead", path, header[1])
        return _window_to_uint8(values, float(values.min()), float(values.max()))
    else:
        raise ValueError(f"window={window!r}; expected 'header', 'minmax' or [center, width]")
    return _window_to_uint8(values, center - width / 2.0, center + width / 2.0)


def _dicom_pixels(path: Path, window) -> np.ndarray:
    """uint8 (H, W) for greyscale DICOM, (H, W, 3) for colour."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    ds, pixels = read_dicom(path)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if pixels.ndim == 3:
        # Colour: no window applies; scale by the stored depth (pydicom already turned YBR into RGB).
        bits = 16 if photometric == "PALETTE COLOR" and pixels.dtype == np.uint16 else int(ds.get("BitsStored", 8) or 8)
        return _window_to_uint8(pixels[..., :3], 0.0, float(2**bits - 1))
    if pixels.ndim != 2:
        raise ScanError(f"{path}: pixel array has shape {pixels.shape}; expected a 2-D image")
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    header = None
    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            header = (_first(ds.WindowCenter), _first(ds.WindowWidth))
        except (TypeError, ValueError, IndexError):
            log.warning("%s: unreadable WindowCenter/WindowWidth; using min-max", path)
    out = _apply_window(path, values, window, header)
    if photometric == "MONOCHROME1":  # 0 is white in MONOCHROME1
        out = 255 - out
    return out


# --------------------------------------------------------------------------- PNG / JPEG

HIGH_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def open_pil(path: Path) -> Image.Image:
    """Open, decode fully (proves readability) and apply the EXIF orientation."""
    try:
        with Image.open(path) as img:
            fmt = {"MPO": "JPEG"}.get(img.format or "", img.format or "unknown")
            if fmt not in ("PNG", "JPEG"):
                raise ScanError(f"{path}: image format is {fmt}; expected PNG or JPEG")
            img.load()
            out = ImageOps.exif_transpose(img)
            out.format = fmt  # exif_transpose returns a new image without .format
            return out
    except ScanError:
        raise
    except Exception as exc:  # OSError, truncated data, decompression bombs, ...
        raise ScanError(f"{path}: not a readable PNG/JPEG ({type(exc).__name__}: {exc})") from None


def _composite_on_black(arr: np.ndarray) -> np.ndarray:
    colour, alpha = arr[..., :-1].astype(np.float64), arr[..., -1:].astype(np.float64) / 255.0
    out = np.rint(colour * alpha).astype(np.uint8)
    return out[..., 0] if out.shape[-1] == 1 else out


def _pil_pixels(path: Path, window) -> np.ndarray:
    """uint8 (H, W) for greyscale images, (H, W, 3) for colour."""
    img = open_pil(path)
    mode = img.mode
    if mode in HIGH_DEPTH_MODES:
        return _apply_window(path, np.asarray(img).astype(np.float64), window, header=None)
    if mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if mode == "1":
        return np.asarray(img.convert("L"), dtype=np.uint8)
    if mode == "LA":
        return _composite_on_black(np.asarray(img))
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    elif mode in ("CMYK", "YCbCr"):
        img = img.convert("RGB")
    if img.mode == "RGBA":
        return _composite_on_black(np.asarray(img))
    if img.mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    raise ScanError(f"{path}: unsupported image mode {mode!r}; expected L, I;16, I, RGB, RGBA, P or LA")


# --------------------------------------------------------------------------- public API


def _to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    if channels == 1:
        if pixels.ndim == 3:
            pixels = np.asarray(Image.fromarray(pixels).convert("L"))
        return pixels[..., None]
    if channels == 3:
        return pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=2)
    raise ValueError(f"channels={channels}; expected 1 or 3")


def load_pixels(path: Path, window: str | list[float], channels: int) -> np.ndarray:
    """Decoded, windowed pixels at full resolution: uint8 (H, W, channels)."""
    path = Path(path)
    check_size(path)
    pixels = _dicom_pixels(path, window) if _is_dicom(path) else _pil_pixels(path, window)
    return np.ascontiguousarray(_to_channels(pixels, channels))


# prepare_image's settings: preprocess records them in meta.json, export copies that into the ONNX
# metadata, and predict passes them back (`prepare_image(path, **recorded_preparation(meta))`).
PREPARATION = ("image_size", "channels", "window", "equalize")
# Settings added later, with the value that models recorded before them were trained with.
PREPARATION_BEFORE = {"equalize": False}


def recorded_preparation(meta: dict) -> dict:
    """The prepare_image settings in a preprocess meta.json; ValueError naming what is missing."""
    missing = [k for k in PREPARATION if k not in meta and k not in PREPARATION_BEFORE]
    if missing:
        raise ValueError(f"the preprocessing record lacks {missing}; expected {list(PREPARATION)}")
    return {**PREPARATION_BEFORE, **{k: meta[k] for k in PREPARATION if k in meta}}


def prepare_image(path: Path, image_size: int, channels: int, window, equalize: bool = False) -> np.ndarray:
    """The model's input for one scan: uint8 (channels, image_size, image_size).

    `equalize` applies histogram equalization to each plane after windowing and before resizing,
    so every scan spans the full grey range whatever its exposure (a scanner or site shift)."""
    pixels = load_pixels(path, window, channels)
    size = (int(image_size), int(image_size))
    planes = [Image.fromarray(np.ascontiguousarray(pixels[..., c])) for c in range(pixels.shape[2])]
    if equalize:
        planes = [ImageOps.equalize(plane) for plane in planes]
    planes = [np.asarray(plane.resize(size, Image.Resampling.BILINEAR, reducing_gap=_REDUCING_GAP)) for plane in planes]
    return np.stack(planes, axis=0).astype(np.uint8, copy=False)
