"""SIIM CT (100 DICOM slices, 54 patients): the patient's age regressed from one slice, patient-level
5-fold cross-validation, against always predicting the mean.

    python -m bench.quality.ct_age [--seeds 0] [--recipe NAME]

Each fold is one `dvc exp run -S split.test_fold=K` of a project with data.task regression, its
labels.csv target the age in the data set's overview.csv, split.method stratified (patient-level
folds, balanced over age bins; the patient is the hashed DICOM PatientID). Reported: each fold's test
MAE, the pooled out-of-fold MAE and R^2 with a 95% interval from a bootstrap over patients, and the
baseline every fold could have had for free: always predicting the mean age of its training split.
No published baseline.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pandas as pd

from bench.quality import harness
from components.data.manifest import read_manifest

NAME = "ct_age"
FOLDS = 5  # split.test_fraction 0.2
RECIPES = {
    "params.yaml defaults @128px, mse": {},
    # ct-slices' training settings (components/presets.yaml) without its classification options
    # (label smoothing, calibration), with the Huber loss.
    "ct-slices training, huber": {
        "sets": {
            "train.epochs": 15,
            "train.batch_size": 16,
            "train.lr": 0.0005,
            "train.warmup_epochs": 1,
            "train.patience": 5,
            "train.loss": "huber",
        }
    },
}


def import_slices(src: Path):
    """Copy dicom_dir/*.dcm to data/raw/slice_<id>.dcm (the source names carry the age and the label)
    and write labels.csv path,target with the overview's Age. The patient comes from the DICOM header."""

    def run(ws: Path) -> None:
        overview = pd.read_csv(src / "overview.csv")
        raw = ws / "data/raw"
        raw.mkdir(parents=True, exist_ok=True)
        rows = []
        for name, age in zip(overview["dicom_name"], overview["Age"]):
            out = f"slice_{name.split('_')[1]}.dcm"  # ID_0000_AGE_0060_... -> slice_0000.dcm
            shutil.copyfile(src / "dicom_dir" / name, raw / out)
            rows.append({"path": out, "target": float(age)})
        pd.DataFrame(rows).to_csv(raw / "labels.csv", index=False)

    return run


def oof_rows(ws: Path) -> list[dict]:
    """This fold's test predictions with each slice's (hashed) patient, and the mean-age baseline:
    the mean target of the fold's training split."""
    preds = pd.read_csv(ws / "reports/test_predictions.csv")
    manifest = read_manifest(ws / "data/manifest.csv")
    train_mean = float(pd.to_numeric(manifest.loc[manifest["split"] == "train", "label"]).mean())
    patients = manifest.set_index("path")["patient"]
    return [
        {"patient": patients[p], "y": float(t), "pred": float(v), "baseline": train_mean}
        for p, t, v in zip(preds["path"], preds["target"], preds["predicted"])
    ]


def mae(rows: pd.DataFrame, column: str = "pred") -> float:
    return float((rows[column] - rows["y"]).abs().mean())


def r2(rows: pd.DataFrame) -> float:
    from sklearn.metrics import r2_score

    return float(r2_score(rows["y"], rows["pred"]))


STATS = {"mae": mae, "baseline_mae": lambda rows: mae(rows, "baseline"), "r2": r2}


def table(runs: list[dict]) -> list[str]:
    lines = [
        "| recipe | seed | fold MAEs, years | pooled out-of-fold MAE (95% CI, patient bootstrap) "
        "| always the training mean: MAE (95% CI) | pooled R^2 (95% CI) | wall time, s (5 folds) |",
        "|---|---|---|---|---|---|---|",
    ]
    for recipe, seed, folds, pooled in harness.pooled_by_recipe(runs):
        value = {k: stat(pooled) for k, stat in STATS.items()}
        fold_maes = ", ".join(f"{r['metrics']['mae']:.1f}" for r in folds)
        ci = harness.patient_bootstrap(pooled, STATS)
        lines.append(
            f"| {recipe} | {seed} | {fold_maes} | {value['mae']:.2f} "
            f"({ci['mae'][0]:.2f}-{ci['mae'][1]:.2f}) | {value['baseline_mae']:.2f} ({ci['baseline_mae'][0]:.2f}-"
            f"{ci['baseline_mae'][1]:.2f}) | {value['r2']:.3f} ({ci['r2'][0]:.3f} to {ci['r2'][1]:.3f}) "
            f"| {sum(r['seconds'] for r in folds):.0f} |"
        )
    return lines


STUDY = harness.CrossValidation(
    name=NAME,
    title=f"SIIM CT: patient age from one slice, patient-level {FOLDS}-fold cross-validation",
    source="siim-ct-contrast-dicom",
    importer=import_slices,
    params={
        "data": {"task": "regression", "label_source": "csv"},
        "split": {"method": "stratified", "test_fraction": 1 / FOLDS, "val_fraction": 0.15},
        "preprocess": {"image_size": 128},
        # Benchmarks measure, they do not release: the regression gate open too.
        "evaluate": {"gate": {"min_r2": None}},
        "retrain": {"compare_metric": "mae"},
    },
    recipes=RECIPES,
    folds=FOLDS,
    oof_rows=oof_rows,
    table=table,
    notes=(
        "No published baseline. Ages 39-83 (mean 67.5, SD 9.3 over the 100 slices). Images: 512 px "
        "DICOM slices windowed with their header's WindowCenter/Width, resized to 128 px; folds are "
        "patient-level (hashed DICOM PatientID), so no patient is in two folds or two splits."
    ),
)
main = STUDY.main


if __name__ == "__main__":
    sys.exit(main())
