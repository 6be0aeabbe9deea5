"""components/data/scans.py and scan_info.py on tiny files written here: DICOM variants, PNG 8/16-bit, JPEG,
corrupt files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from components.data.scan_info import ScanInfo, probe
from components.data.scans import PREPARATION, ScanError, is_candidate, load_pixels, prepare_image

SECRET_ID = "PAT-SECRET-0042"
SECRET_NAME = "Doe^Jane"


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    signed: bool = False,
    bits_stored: int | None = None,
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple | None = None,
    syntax=ExplicitVRLittleEndian,
    preamble: bool = True,
    modality: str = "CT",
) -> Path:
    """A minimal single-frame DICOM; `preamble=False` writes a bare dataset without file meta."""
    ds = Dataset()
    ds.PatientID, ds.PatientName, ds.PatientBirthDate = SECRET_ID, SECRET_NAME, "19700101"
    ds.Modality = modality
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.tobytes()
    implicit = syntax == ImplicitVRLittleEndian
    if preamble:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(path, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
    else:
        ds.save_as(path, implicit_vr=implicit, little_endian=True)
    return path


def ramp(dtype, lo: int, hi: int, shape=(8, 8)) -> np.ndarray:
    return np.linspace(lo, hi, shape[0] * shape[1]).round().astype(dtype).reshape(shape)


def test_signed_ct_with_rescale_and_header_window(tmp_path):
    # Stored -1024..1024, slope 1 intercept -1000 -> HU -2024..24; window 0/400 -> [-200, 200].
    raw = ramp(np.int16, -1024, 1024)
    path = write_dicom(
        tmp_path / "ct.dcm", raw, signed=True, slope=1.0, intercept=-1000.0, window=([0.0, 40.0], [400.0, 80.0])
    )  # multi-valued: the first window wins
    hu = raw.astype(np.float64) - 1000.0
    expected = np.rint(np.clip((hu + 200.0) / 400.0, 0, 1) * 255).astype(np.uint8)
    out = load_pixels(path, "header", 1)
    assert out.shape == (8, 8, 1) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], expected)
    info = probe(path)
    assert info == ScanInfo(
        width=8, height=8, channels=1, bit_depth=16, modality="CT", patient_id=SECRET_ID, is_dicom=True
    )


def test_explicit_window_and_minmax(tmp_path):
    raw = ramp(np.int16, -1024, 1024)
    path = write_dicom(tmp_path / "ct.dcm", raw, signed=True, slope=2.0, intercept=10.0, window=(0, 400))
    values = raw * 2.0 + 10.0
    exp = np.rint(np.clip((values - 0.0) / 1000.0, 0, 1) * 255).astype(np.uint8)  # [center 500, width 1000]
    np.testing.assert_array_equal(load_pixels(path, [500, 1000], 1)[..., 0], exp)
    mm = load_pixels(path, "minmax", 1)[..., 0]
    assert mm.min() == 0 and mm.max() == 255 and mm[0, 0] == 0 and mm[-1, -1] == 255


def test_uint16_without_window_falls_back_to_minmax_and_implicit_vr(tmp_path):
    raw = ramp(np.uint16, 100, 4095)
    path = write_dicom(tmp_path / "mr.dcm", raw, bits_stored=12, syntax=ImplicitVRLittleEndian, modality="MR")
    exp = np.rint((raw - 100.0) / (4095.0 - 100.0) * 255).astype(np.uint8)
    np.testing.assert_array_equal(load_pixels(path, "header", 1)[..., 0], exp)
    info = probe(path)
    assert (info.bit_depth, info.modality, info.channels) == (12, "MR", 1)


def test_monochrome1_is_inverted(tmp_path):
    raw = ramp(np.uint16, 0, 1000)
    m2 = load_pixels(write_dicom(tmp_path / "m2.dcm", raw), "minmax", 1)
    m1 = load_pixels(write_dicom(tmp_path / "m1.dcm", raw, photometric="MONOCHROME1"), "minmax", 1)
    np.testing.assert_array_equal(m1, 255 - m2)
    assert m1[0, 0, 0] == 255  # lowest stored value is white in MONOCHROME1


def test_file_without_extension_and_preamble(tmp_path):
    raw = ramp(np.uint8, 0, 255)
    path = write_dicom(tmp_path / "IM0001", raw, syntax=ImplicitVRLittleEndian, preamble=False)
    assert path.read_bytes()[128:132] != b"DICM"
    assert is_candidate(path)
    info = probe(path)
    assert info.is_dicom and (info.width, info.height, info.bit_depth) == (8, 8, 8)
    np.testing.assert_array_equal(load_pixels(path, "minmax", 1)[..., 0], raw)


def test_rgb_dicom_to_luminance_and_rgb(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 200
    path = write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB", modality="XC")
    out3 = load_pixels(path, "header", 3)
    np.testing.assert_array_equal(out3, rgb)
    grey = load_pixels(path, "header", 1)
    assert grey.shape == (8, 8, 1) and abs(int(grey[0, 0, 0]) - round(200 * 0.299)) <= 1
    assert probe(path).channels == 3


def test_png_8_and_16_bit(tmp_path):
    g8 = ramp(np.uint8, 0, 255)
    Image.fromarray(g8).save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_pixels(tmp_path / "a.png", "header", 1)[..., 0], g8)
    rgb = load_pixels(tmp_path / "a.png", "header", 3)
    assert rgb.shape == (8, 8, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    info = probe(tmp_path / "a.png")
    assert (info.modality, info.bit_depth, info.channels, info.patient_id, info.is_dicom) == ("PNG", 8, 1, None, False)

    g16 = ramp(np.uint16, 1000, 5000)
    Image.fromarray(g16).save(tmp_path / "b.png")
    assert probe(tmp_path / "b.png").bit_depth == 16
    exp = np.rint((g16 - 1000.0) / 4000.0 * 255).astype(np.uint8)  # "header" -> min-max for PNG
    np.testing.assert_array_equal(load_pixels(tmp_path / "b.png", "header", 1)[..., 0], exp)
    exp_w = np.rint(np.clip((g16 - 2000.0) / 2000.0, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(load_pixels(tmp_path / "b.png", [3000, 2000], 1)[..., 0], exp_w)


def test_png_rgba_la_and_palette(tmp_path):
    rgba = np.full((4, 4, 4), 200, np.uint8)
    rgba[..., 3] = 0
    rgba[0, 0, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    out = load_pixels(tmp_path / "rgba.png", "header", 3)
    assert out[0, 0].tolist() == [200, 200, 200] and out[1, 1].tolist() == [0, 0, 0]
    Image.fromarray(rgba[..., [0, 3]]).save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    la = load_pixels(tmp_path / "la.png", "header", 1)
    assert la[0, 0, 0] == 200 and la[1, 1, 0] == 0
    Image.fromarray(ramp(np.uint8, 0, 255)).convert("P").save(tmp_path / "p.png")
    assert load_pixels(tmp_path / "p.png", "header", 1).shape == (8, 8, 1)


def test_jpeg_uppercase_extension_and_exif_orientation(tmp_path):
    img = np.zeros((8, 16, 3), np.uint8)
    img[:, :8] = (250, 10, 10)
    path = tmp_path / "photo.JPG"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": width and height swap
    Image.fromarray(img).save(path, quality=95, exif=exif)
    assert is_candidate(path)
    info = probe(path)
    assert (info.modality, info.width, info.height, info.channels) == ("JPEG", 8, 16, 3)
    assert load_pixels(path, "header", 3).shape == (16, 8, 3)


def test_prepare_image_resizes_to_square(tmp_path):
    Image.fromarray(np.full((30, 20), 77, np.uint8)).save(tmp_path / "r.png")
    out = prepare_image(tmp_path / "r.png", 16, 3, "header")
    assert out.shape == (3, 16, 16) and out.dtype == np.uint8 and (out == 77).all()
    assert prepare_image(tmp_path / "r.png", 12, 1, "header").shape == (1, 12, 12)


def test_equalize_removes_an_exposure_shift(tmp_path):
    """The same scan exposed brighter equalizes to the same input; without it the inputs differ."""
    scene = np.random.default_rng(0).integers(0, 100, (24, 24), dtype=np.uint8)
    Image.fromarray(scene).save(tmp_path / "dark.png")
    Image.fromarray(scene + 120).save(tmp_path / "bright.png")
    dark, bright = (prepare_image(tmp_path / f"{n}.png", 24, 1, "header", equalize=True) for n in ("dark", "bright"))
    np.testing.assert_array_equal(dark, bright)
    assert dark.min() < 20 and dark.max() > 235  # stretched over the grey range
    plain = prepare_image(tmp_path / "bright.png", 24, 1, "header")
    assert plain.min() >= 120 and not np.array_equal(plain, bright)


def test_is_candidate_skips_non_scans(tmp_path):
    for name, data in [
        (".hidden.png", b"x"),
        ("labels.csv", b"path,label\n"),
        ("raw.dvc", b"outs:\n"),
        ("notes", b"just some text\n"),
        ("README.md", b"# hi\n"),
    ]:
        (tmp_path / name).write_bytes(data)
        assert not is_candidate(tmp_path / name), name
    (tmp_path / "x.PNG").write_bytes(b"")
    (tmp_path / "y.jpeg").write_bytes(b"")
    assert is_candidate(tmp_path / "x.PNG") and is_candidate(tmp_path / "y.jpeg")


def test_corrupt_files_raise_scan_error_without_identifiers(tmp_path):
    png = tmp_path / "bad.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ScanError, match="bad.png"):
        probe(png)
    good = tmp_path / "trunc.jpg"
    Image.fromarray(ramp(np.uint8, 0, 255, (32, 32))).save(good)
    good.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ScanError, match="trunc.jpg"):
        load_pixels(good, "header", 1)
    dcm = write_dicom(tmp_path / "cut.dcm", ramp(np.uint16, 0, 100, (16, 16)))
    dcm.write_bytes(dcm.read_bytes()[:-300])  # pixel data shorter than Rows*Columns
    with pytest.raises(ScanError) as err:
        probe(dcm)
    assert "cut.dcm" in str(err.value) and SECRET_ID not in str(err.value) and "Doe" not in str(err.value)
    with pytest.raises(ScanError, match="no such file"):
        probe(tmp_path / "missing.dcm")


def test_compressed_syntax_without_decoder_names_it(tmp_path):
    path = write_dicom(tmp_path / "jls.dcm", ramp(np.uint16, 0, 100))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\xff\xd8not-a-real-jpeg-ls-stream\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ScanError) as err:
        probe(path)
    assert "JPEG-LS Lossless" in str(err.value) and "pip install" in str(err.value)


def test_every_prepare_image_setting_is_one_that_models_record():
    """A new prepare_image argument must join PREPARATION, or predict would not repeat it."""
    import inspect

    assert tuple(inspect.signature(prepare_image).parameters)[1:] == PREPARATION


def test_a_zero_filled_dcm_is_refused_from_its_first_bytes(tmp_path):
    """pydicom with force=True used to walk a zero-filled file tag by empty tag (64 MB: 28 s)."""
    path = tmp_path / "zeros.dcm"
    with open(path, "wb") as fh:
        fh.truncate(64 * 2**20)
    with pytest.raises(ScanError, match="zeros.dcm: not a DICOM file"):
        probe(path)


def test_a_huge_file_is_refused_from_its_size_without_reading_it(tmp_path):
    """A sparse 4 GiB file: refused by stat alone (reading it would take minutes); never hashed."""
    from components.data import ingest, scans

    path = tmp_path / "huge.dcm"
    with open(path, "wb") as fh:
        fh.truncate(4 * 2**30)
    for read in (probe, lambda p: prepare_image(p, 32, 1, "header")):
        with pytest.raises(ScanError, match=r"huge.dcm: file is 4,096 MiB; expected a single 2-D image of at most 256"):
            read(path)
    row, _, _ = ingest.scan_row(path, "huge.dcm", "normal", "", None, b"salt")
    assert row["sha256"] == "" and row["error"].startswith("file is 4,096 MiB")
    assert scans.MAX_FILE_BYTES < 4 * 2**30


def test_an_empty_file_is_refused_by_name(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ScanError, match="empty.png: empty file"):
        probe(tmp_path / "empty.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_scan_without_extension_is_found_by_its_bytes(tmp_path, fmt):
    Image.new("L", (20, 20), 9).save(tmp_path / "scan", format=fmt)
    assert is_candidate(tmp_path / "scan") and probe(tmp_path / "scan").modality == fmt
