"""Test inputs made on the spot: tiny params, data/prepared folders, random-weight checkpoints, an
export project, scans (a DICOM, a smooth picture) and validate's manifest rows.

    from tests.builders import make_checkpoint, make_prepared, tiny_params

Heavy libraries (torch, pandas, pydicom, scipy) are imported by the builder that needs them, so a
test module that imports one builder does not pay for the others at collection.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from components.common import hash_patient, sha256_bytes
from components.params import Params, parse_params

CLASSES = ("normal", "lesion")
RAW_PATIENT = "PAT-RAW-0001"  # a raw id that must never reach an artefact (make_prepared hashes it)
RAW_NAME, RAW_ID = "Doe^Jane", "PID-775533"  # the patient in write_dicom's header


# ---------------------------------------------------------------------------------------------
# Parameters, prepared arrays, checkpoints: evaluate, export and predict on a random-weight model
# ---------------------------------------------------------------------------------------------


def tiny_params(**gate):
    # A random-weight model on 8 images: every gate open unless a test closes one.
    return parse_params(
        {
            "evaluate": {
                "positive_class": "lesion",
                "bootstrap": 40,
                "gate": {
                    "min_auroc": 0.0,
                    "min_sensitivity": 0.0,
                    "min_specificity": 0.0,
                    "min_balanced_accuracy": 0.0,
                    **gate,
                },
            }
        }
    )


def make_prepared(root, classes=CLASSES, per_class=None, channels=1, size=32, seed=0):
    """A data/prepared folder as preprocess writes it: {split}.npy, index.csv, meta.json; `per_class`
    images of each class per split, patients hashed from RAW_PATIENT (for evaluate and export)."""
    import pandas as pd

    per_class = per_class or {"train": 2, "val": 2, "test": 4}
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n in per_class.items():
        images = []
        for li, cls in enumerate(classes):
            for i in range(n):
                img = rng.integers(0, 120, size=(channels, size, size), dtype=np.uint8)
                img[:, 8:20, 8:20] += np.uint8(100 * li)  # a brighter square for later classes
                images.append(img)
                rows.append(
                    {
                        "split": split,
                        "row": len(images) - 1,
                        "path": f"{cls}/{split}_{i}.png",
                        "sha256": f"{split}{li}{i}".ljust(64, "0"),
                        "label": cls,
                        "label_index": li,
                        "patient": hash_patient(f"{RAW_PATIENT}-{split}-{i}", b"salt"),
                    }
                )
        np.save(root / f"{split}.npy", np.stack(images))
    pd.DataFrame(rows).to_csv(root / "index.csv", index=False)
    meta = {
        "classes": list(classes),
        "image_size": size,
        "channels": channels,
        "window": "header",
        "resize": "bilinear",
        "input": "uint8 NCHW",
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def write_prepared(root: Path, n_train: int = 16, n_val: int = 8, size: int = 32, channels: int = 1) -> Path:
    """A tiny data/prepared folder as preprocess writes it, for training: labels alternate, lesions
    are a bright square (learnable in an epoch or two)."""
    import pandas as pd

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n in (("train", n_train), ("val", n_val), ("test", 4)):
        labels = np.arange(n) % 2
        images = rng.integers(0, 80, (n, channels, size, size), dtype=np.uint8)
        images[labels == 1, :, size // 4 : size // 2, size // 4 : size // 2] = 230
        np.save(root / f"{split}.npy", images)
        rows += [
            {
                "split": split,
                "row": i,
                "path": f"{split}/{i}.png",
                "sha256": f"{i:064x}",
                "label": CLASSES[lab],
                "label_index": int(lab),
                "patient": f"{i:016x}",
            }
            for i, lab in enumerate(labels)
        ]
    pd.DataFrame(rows).to_csv(root / "index.csv", index=False)
    (root / "meta.json").write_text(
        json.dumps(
            {
                "classes": list(CLASSES),
                "image_size": size,
                "channels": channels,
                "window": "header",
                "input": "uint8 NCHW",
            }
        )
    )
    return root


def make_checkpoint(path, classes=CLASSES, channels=1, size=32, seed=0, members=1):
    """A checkpoint in the documented train format, with random `none`-backbone weights (an
    ensemble of `members` such models when members > 1)."""
    import torch

    from components.model.models import Ensemble, build_model

    models = []
    for m in range(members):
        torch.manual_seed(seed + m)
        model, info = build_model("none", len(classes), channels, False)
        models.append(model)
    model = Ensemble(models) if members > 1 else models[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": model.state_dict(),
            "members": members,
            "backbone": model.arch,
            "classes": list(classes),
            "in_channels": channels,
            "image_size": size,
            "params": {"train": {"freeze": "all", "optimizer": "adamw", "lr": 1e-3, "seed": seed}, "augment": {}},
            "pretrained": info,
            "history": [],
            "best_epoch": 1,
            "epochs_run": 1,
            "best_metric": {"name": "val_auroc", "value": 0.5},
            "device": "cpu",
            "processor": "Test Processor 9000",
        },
        path,
    )
    return path


def make_project(root, params, classes=CLASSES, channels=1, members=1):
    """Everything export reads: prepared data, checkpoint, evaluate's reports, manifest, validation."""
    from components.model.evaluate import evaluate

    prepared = make_prepared(root / "data" / "prepared", classes=classes, channels=channels)
    ckpt = make_checkpoint(root / "models" / "model.pt", classes=classes, channels=channels, members=members)
    reports = root / "reports"
    evaluate(ckpt, prepared, reports, params)
    manifest = root / "data" / "manifest.json"
    counts = {s: {c: n for c in classes} for s, n in (("train", 2), ("val", 2), ("test", 4))}
    manifest.write_text(
        json.dumps(
            {
                "data_version": "d41d8cd98f00b204e9800998ecf8427e.dir",
                "content_hash": "ab" * 32,
                "n_images": 16 * len(classes),
                "n_unreadable": 0,
                "counts": counts,
                "patient_source": "dicom",
                "split": {
                    "method": "stratified-group",
                    "seed": 42,
                    "val_fraction": 0.2,
                    "test_fraction": 0.25,
                    "patients": {"train": 2, "val": 2, "test": 4},
                    "patient_overlap": 0,
                    "source": "stratified-group",
                },
            }
        )
    )
    manifest.with_suffix(".csv").write_text("path,sha256,label,patient\nnormal/a.png,00,normal,0123456789abcdef\n")
    (reports / "validation.json").write_text(
        json.dumps(
            {
                "success": True,
                "suite": "manifest",
                "failures": [],
                "expectations": [
                    {"name": "labels_known", "critical": True, "success": True, "details": {}},
                    {"name": "size_range", "critical": False, "success": False, "details": {}},
                    {"name": "duplicates_in_one_split", "critical": False, "success": True, "details": {}},
                    {
                        "name": "near_duplicates_in_one_split",
                        "critical": False,
                        "success": False,
                        "details": {"n_offending": 3},
                    },
                ],
            }
        )
    )
    return {"model": ckpt, "prepared": prepared, "reports": reports, "out": root / "models", "manifest": manifest}


def run_export(p, params):
    """The export stage on a make_project project."""
    from components.release.export import export

    return export(p["model"], p["prepared"], p["reports"], p["out"], params, manifest_path=p["manifest"])


def add_report_evidence(root: Path, params: Params, explanations: int = 2) -> None:
    """What an export project lacks of a pipeline run's evidence (`medtune report` shows it): augment's
    preview (the real stage function), DVCLive curves of three epochs (train's own writer) and
    `explanations` PNG samples under reports/explanations/<class>/."""
    from PIL import Image

    from components.data.augment import preview
    from components.model.live import log_epoch, open_live

    root = Path(root)
    preview(root / "data" / "prepared", root / "reports" / "augment_preview.png", params)
    live = open_live(root / "dvclive")
    for epoch in (1, 2, 3):
        log_epoch(
            live,
            {
                "epoch": epoch,
                "train_loss": 1.0 / epoch,
                "val_loss": 1.2 / epoch,
                "val_auroc": 0.5 + 0.1 * epoch,
                "val_accuracy": 0.5 + 0.05 * epoch,
                "lr": 1e-3,
            },
        )
    live.end()
    for i in range(explanations):
        out = root / "reports" / "explanations" / CLASSES[i % 2] / f"true_positive_{i}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture(i, 48)).save(out)


# ---------------------------------------------------------------------------------------------
# Scans
# ---------------------------------------------------------------------------------------------


def write_dicom(path, pixels):
    """A 12-bit CT DICOM of `pixels` with a header window, whose header names RAW_NAME / RAW_ID."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = RAW_NAME, RAW_ID, "19700101"
    ds.Modality, ds.SOPClassUID, ds.SOPInstanceUID = "CT", meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def picture(seed: int, size: int = 64) -> np.ndarray:
    """A smooth, scan-like grey picture (uint8), different for every seed."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(np.random.default_rng(seed).normal(size=(size, size)), sigma=size / 10)
    return np.interp(field, (field.min(), field.max()), (0, 255)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Manifests for the validate stage
# ---------------------------------------------------------------------------------------------

SALT = b"test-salt"  # the salt clean_rows hashes patients with


def clean_rows() -> list[dict]:
    """Two images per (split, class); one patient per image pair, each patient in one split."""
    rows = []
    for split in ("train", "val", "test"):
        for label in CLASSES:
            for i in range(2):
                name = f"{label}/{split}_{i}.png"
                rows.append(
                    dict(
                        path=name,
                        sha256=sha256_bytes(name.encode()),
                        label=label,
                        patient=hash_patient(f"{split}-{i}", SALT),
                        width=32,
                        height=32,
                        channels=1,
                        bit_depth=8,
                        modality="PNG",
                        split=split,
                        error="",
                    )
                )
    return rows


def write_manifest(tmp_path: Path, rows: list[dict]) -> tuple[Path, Path]:
    import pandas as pd

    csv, js = tmp_path / "manifest.csv", tmp_path / "manifest.json"
    pd.DataFrame(rows).sort_values("path").to_csv(csv, index=False)
    js.write_text(json.dumps({"n_images": len(rows), "data_version": "untracked", "content_hash": "abc"}))
    return csv, js


def validate_rows(tmp_path: Path, rows: list[dict], params: Params | None = None) -> tuple[Path, Path]:
    """The validate stage on a manifest of `rows` written under tmp_path; its two reports."""
    from components.data import validate

    csv, js = write_manifest(tmp_path, rows)
    out_json, out_md = tmp_path / "reports" / "validation.json", tmp_path / "reports" / "validation.md"
    validate.validate(csv, js, out_json, out_md, params or Params())
    return out_json, out_md


def with_validate(**kw) -> Params:
    p = Params()
    return p.model_copy(update={"validate": p.validate.model_copy(update=kw)}).check()
