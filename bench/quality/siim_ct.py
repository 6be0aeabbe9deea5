"""SIIM CT contrast (100 DICOM slices, 54 patients): patient-level 5-fold cross-validated AUROC.

    python -m bench.quality.siim_ct [--seeds 0] [--recipe NAME]

No published baseline. Each fold is one `dvc exp run -S split.method=stratified -S split.test_fold=K`
(StratifiedGroupKFold on the DICOM PatientID, hashed by ingest), so every patient is tested exactly once. Reported: the
AUROC of each fold, their mean ± SD, and the pooled out-of-fold AUROC with a 95% interval from a
bootstrap over patients (slices of one patient are resampled together).
"""

from __future__ import annotations

import shutil
import statistics
import sys
from pathlib import Path

import pandas as pd

from bench.quality import harness
from components.data.manifest import read_manifest

NAME = "siim_ct"
FOLDS = 5  # split.test_fraction 0.2
RECIPES = {
    "params.yaml defaults @128px": {},
    "ct-slices": {"preset": "ct-slices"},
}


def import_slices(src: Path):
    """Copy dicom_dir/*.dcm into data/raw/<class>/ with neutral names: the source names carry the
    patient's age, which must not reach the manifest. Labels from the CONTRAST_0/1 token."""

    def run(ws: Path) -> None:
        for dcm in sorted((src / "dicom_dir").glob("*.dcm")):
            label = "contrast" if "_CONTRAST_1_" in dcm.name else "no_contrast"
            out = ws / "data/raw" / label / f"slice_{dcm.name.split('_')[1]}.dcm"  # ID_0000_AGE_... -> slice_0000
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(dcm, out)

    return run


def oof_rows(ws: Path) -> list[dict]:
    """This fold's test predictions with the (hashed) patient of each slice."""
    preds = pd.read_csv(ws / "reports/test_predictions.csv")
    patients = read_manifest(ws / "data/manifest.csv").set_index("path")["patient"]
    return [
        {"patient": patients[p], "y": int(lab == "contrast"), "score": float(s)}
        for p, lab, s in zip(preds["path"], preds["label"], preds["prob_contrast"])
    ]


def auroc(rows: pd.DataFrame) -> float | None:
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(rows["y"], rows["score"]) if rows["y"].nunique() == 2 else None


def table(runs: list[dict]) -> list[str]:
    lines = [
        "| recipe | seed | fold AUROCs | mean ± SD | pooled out-of-fold AUROC (95% CI, patient bootstrap) "
        "| accuracy (mean over folds) | wall time, s (5 folds) |",
        "|---|---|---|---|---|---|---|",
    ]
    for recipe, seed, folds, pooled in harness.pooled_by_recipe(runs):
        aurocs = [r["metrics"]["auroc"] for r in folds]
        lo, hi = harness.patient_bootstrap(pooled, {"auroc": auroc})["auroc"]
        acc = statistics.mean(r["metrics"]["accuracy"] for r in folds)
        lines.append(
            f"| {recipe} | {seed} | {', '.join(f'{a:.3f}' for a in aurocs)} | "
            f"{statistics.mean(aurocs):.3f} ± {statistics.stdev(aurocs):.3f} | {auroc(pooled):.3f} ({lo:.3f}-{hi:.3f}) "
            f"| {acc:.3f} | {sum(r['seconds'] for r in folds):.0f} |"
        )
    return lines


STUDY = harness.CrossValidation(
    name=NAME,
    title=f"SIIM CT contrast (DICOM, 54 patients): patient-level {FOLDS}-fold cross-validation",
    source="siim-ct-contrast-dicom",
    importer=import_slices,
    params={
        "data": {"label_source": "folder", "classes": ["no_contrast", "contrast"]},
        "split": {"test_fraction": 1 / FOLDS, "val_fraction": 0.15},
        "preprocess": {"image_size": 128},
        "evaluate": {"positive_class": "contrast"},
    },
    recipes=RECIPES,
    folds=FOLDS,
    oof_rows=oof_rows,
    table=table,
    notes=(
        "No published baseline. Images: 512 px DICOM slices windowed with their header's "
        "WindowCenter/Width, resized to 128 px; folds are StratifiedGroupKFold over the hashed "
        "DICOM PatientID, so no patient is in two folds or two splits."
    ),
)
main = STUDY.main


if __name__ == "__main__":
    sys.exit(main())
