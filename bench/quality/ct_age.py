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

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
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


def patient_bootstrap(df: pd.DataFrame, n: int = 2000, seed: int = 0) -> dict[str, tuple[float, float]]:
    """95% intervals of MAE, baseline MAE and R^2, resampling patients (their slices together)."""
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(seed)
    groups = [g for _, g in df.groupby("patient")]
    values: dict[str, list[float]] = {"mae": [], "baseline_mae": [], "r2": []}
    for _ in range(n):
        s = pd.concat([groups[i] for i in rng.integers(0, len(groups), len(groups))])
        values["mae"].append(float((s["pred"] - s["y"]).abs().mean()))
        values["baseline_mae"].append(float((s["baseline"] - s["y"]).abs().mean()))
        values["r2"].append(float(r2_score(s["y"], s["pred"])))
    return {k: tuple(float(x) for x in np.percentile(v, [2.5, 97.5])) for k, v in values.items()}


def table(runs: list[dict]) -> list[str]:
    from sklearn.metrics import r2_score

    lines = [
        "| recipe | seed | fold MAEs, years | pooled out-of-fold MAE (95% CI, patient bootstrap) "
        "| always the training mean: MAE (95% CI) | pooled R^2 (95% CI) | wall time, s (5 folds) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (recipe, seed), group in pd.DataFrame(runs).groupby(["recipe", "seed"], sort=False):
        folds = [r["metrics"]["mae"] for r in group.to_dict("records")]
        pooled = pd.DataFrame([p for r in group["oof"] for p in r])
        mae = float((pooled["pred"] - pooled["y"]).abs().mean())
        base = float((pooled["baseline"] - pooled["y"]).abs().mean())
        r2 = float(r2_score(pooled["y"], pooled["pred"]))
        ci = patient_bootstrap(pooled)
        lines.append(
            f"| {recipe} | {seed} | {', '.join(f'{a:.1f}' for a in folds)} | {mae:.2f} "
            f"({ci['mae'][0]:.2f}-{ci['mae'][1]:.2f}) | {base:.2f} ({ci['baseline_mae'][0]:.2f}-"
            f"{ci['baseline_mae'][1]:.2f}) | {r2:.3f} ({ci['r2'][0]:.3f} to {ci['r2'][1]:.3f}) "
            f"| {sum(group['seconds']):.0f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", action="append", choices=list(RECIPES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args(argv)
    src = harness.dataset("siim-ct-contrast-dicom")
    if src is None:
        return 0
    if not args.table_only:
        ws = harness.make_project(
            NAME,
            import_slices(src),
            {
                "data": {"task": "regression", "label_source": "csv"},
                "split": {"method": "stratified", "test_fraction": 1 / FOLDS, "val_fraction": 0.15},
                "preprocess": {"image_size": 128},
                # Benchmarks measure, they do not release: the regression gate open too.
                "evaluate": {"gate": {"min_r2": None}},
                "retrain": {"compare_metric": "mae"},
            },
        )
        for label in args.recipe or list(RECIPES):
            for seed in args.seeds:
                for fold in range(FOLDS):
                    sets = {**RECIPES[label].get("sets", {}), "train.seed": seed, "split.test_fold": fold}
                    row = harness.exp_run(ws, harness.exp_name(label, seed, f"-fold{fold}"), sets)
                    print(f"  {label} seed {seed} fold {fold}: MAE {row['metrics']['mae']:.2f}", flush=True)
                    harness.record(NAME, label, {**row, "seed": seed, "fold": fold, "oof": oof_rows(ws)})
    runs = harness.recorded(NAME)
    if runs:
        from components.common import write_text

        lines = [
            f"# SIIM CT: patient age from one slice, patient-level {FOLDS}-fold cross-validation",
            "",
            f"Runs recorded by `dvc exp run` in bench/quality/.work/{NAME}; machine: "
            f"{'; '.join(sorted({r['machine'] for r in runs}))}.",
            "",
            *table(runs),
            "",
            "No published baseline. Ages 39-83 (mean 67.5, SD 9.3 over the 100 slices). Images: 512 px "
            "DICOM slices windowed with their header's WindowCenter/Width, resized to 128 px; folds are "
            "patient-level (hashed DICOM PatientID), so no patient is in two folds or two splits.",
            "",
        ]
        write_text(harness.RESULTS / f"{NAME}.md", "\n".join(lines))
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
