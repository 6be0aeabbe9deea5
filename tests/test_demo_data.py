"""The synthetic demo scans: deterministic bytes, real DICOM with identifiers, which ingest hashes away."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from components.data import demo_data, ingest, scan_info, scans
from components.params import Params

CLASSES = ["normal", "lesion"]


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_arguments_give_identical_bytes(tmp_path):
    n = demo_data.generate(tmp_path / "a", patients=4, slices=2, size=32, seed=3, classes=CLASSES)
    demo_data.generate(tmp_path / "b", patients=4, slices=2, size=32, seed=3, classes=CLASSES)
    demo_data.generate(tmp_path / "c", patients=4, slices=2, size=32, seed=4, classes=CLASSES)
    a = tree(tmp_path / "a")
    assert n == len(a) == 8
    assert a == tree(tmp_path / "b")
    assert a != tree(tmp_path / "c")


def test_dicom_headers_identifiers_and_label_mix(tmp_path):
    demo_data.generate(tmp_path, patients=4, slices=5, size=32, seed=0, classes=CLASSES)
    files = sorted(tmp_path.rglob("*.dcm"))
    syntaxes, by_patient = set(), {}
    for f in files:
        ds = pydicom.dcmread(f)
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        number = int(f.name[4:7])
        assert str(ds.PatientName) == f"Demo^Patient{number:03d}"
        assert ds.PatientID == f"DEMO-{number:03d}"
        assert len(ds.PatientBirthDate) == 8 and len(ds.StudyDate) == 8
        assert ds.PixelRepresentation == 1 and ds.pixel_array.dtype == np.int16
        assert float(ds.RescaleIntercept) == -1024 and float(ds.WindowWidth) > 0
        assert ds.Rows == ds.Columns == 32
        by_patient.setdefault(ds.PatientID, []).append(f.parent.name)
        assert scans.prepare_image(f, 32, 1, "header").shape == (1, 32, 32)  # decodable by the pipeline
    assert syntaxes == {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
    # Half the patients never show a lesion; the others show it on most slices.
    lesion_share = sorted(labels.count("lesion") / len(labels) for labels in by_patient.values())
    assert lesion_share[:2] == [0.0, 0.0] and min(lesion_share[2:]) >= 0.6


def test_lesion_is_a_visible_blob():
    # Same anatomy, with and without the lesion: the lesion must stand out from the noise by at
    # least a quarter of the soft-tissue window (100 HU of 400) over a blob of pixels.
    anatomy = demo_data._anatomy(np.random.default_rng(5))

    def pair(lesion: bool) -> np.ndarray:
        a = demo_data._slice_hu(np.random.default_rng(1), anatomy, 32, 0.5, lesion)
        b = demo_data._slice_hu(np.random.default_rng(2), anatomy, 32, 0.5, False)
        return np.abs(a - b)

    assert (pair(True) > 100).sum() >= 4
    assert (pair(False) > 100).sum() == 0


def test_identifiers_never_reach_the_manifest(tmp_path):
    raw = tmp_path / "raw"
    demo_data.generate(raw, patients=10, slices=2, size=32, seed=0, classes=CLASSES)
    ingest.ingest(raw, tmp_path / "data", Params())
    text = (tmp_path / "data/manifest.csv").read_text() + (tmp_path / "data/manifest.json").read_text()
    for f in raw.rglob("*.dcm"):
        ds = pydicom.dcmread(f)
        for value in (
            str(ds.PatientName),
            ds.PatientID,
            ds.PatientBirthDate,
            ds.StudyDate,
            f"Patient{ds.PatientID[-3:]}",
        ):
            assert value not in text, value


def test_extra_batch_has_new_patients(tmp_path):
    out = tmp_path / "raw"
    assert demo_data.main(["--out", str(out), "--patients", "3", "--slices", "1", "--size", "16"]) == 0
    base_ids = {pydicom.dcmread(f).PatientID for f in out.rglob("*.dcm")}
    assert (
        demo_data.main(["--out", str(out), "--patients", "3", "--slices", "1", "--size", "16", "--batch-name", "june"])
        == 0
    )
    all_ids = {pydicom.dcmread(f).PatientID for f in out.rglob("*.dcm")}
    assert len(base_ids) == 3 and len(all_ids) == 6
    # Writing the same batch twice is refused rather than silently overwriting it.
    assert (
        demo_data.main(["--out", str(out), "--patients", "3", "--slices", "1", "--size", "16", "--batch-name", "june"])
        == 1
    )


def test_bad_arguments_are_named(tmp_path, capsys):
    assert demo_data.main(["--out", str(tmp_path), "--patients", "0"]) == 1
    assert "--patients = 0" in capsys.readouterr().err


def test_default_demo_has_no_group_of_near_duplicates_that_could_fill_a_split(tmp_path):
    """Synthetic bodies are alike; their outlines vary enough that no near-duplicate group (leader
    grouping, split.near_duplicate_correlation 0.99) holds more than a tenth of the 240 images (23
    at most: the slices of about four patients). Chained by connected components, one held 84."""
    from components.data import near_duplicates

    demo_data.generate(tmp_path, patients=40, slices=6, size=64, seed=0, classes=CLASSES)
    files = sorted(tmp_path.rglob("*.dcm"))
    thumbs = near_duplicates.standardise([scan_info.probe(f).thumbnail for f in files])
    leader = near_duplicates.leaders(len(files), near_duplicates.pairs(thumbs, 0.99))
    assert np.bincount(leader).max() <= len(files) // 10
