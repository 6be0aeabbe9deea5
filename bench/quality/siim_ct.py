"""SIIM CT contrast (100 DICOM slices, 54 patients): patient-level 5-fold cross-validated AUROC.

    python -m bench.quality.siim_ct [--seeds 0] [--recipe NAME]

No published baseline. Each fold is one `dvc exp run -S split.method=stratified -S split.test_fold=K`
(StratifiedGroupKFold on the DICOM PatientID, hashed by ingest), so every patient is tested exactly once. Reported: the
AUROC of each fold, their mean ± SD, and the pooled out-of-fold AUROC with a 95% interval from a
bootstrap over patients (slices of one patient are resampled together).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
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


def patient_bootstrap(df: pd.DataFrame, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    groups = [g for _, g in df.groupby("patient")]
    values = []
    for _ in range(n):
        sample = pd.concat([groups[i] for i in rng.integers(0, len(groups), len(groups))])
        if sample["y"].nunique() == 2:
            values.append(roc_auc_score(sample["y"], sample["score"]))
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def table(runs: list[dict]) -> list[str]:
    from sklearn.metrics import roc_auc_score

    lines = [
        "| recipe | seed | fold AUROCs | mean ± SD | pooled out-of-fold AUROC (95% CI, patient bootstrap) "
        "| accuracy (mean over folds) | wall time, s (5 folds) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (recipe, seed), group in pd.DataFrame(runs).groupby(["recipe", "seed"], sort=False):
        folds = [r["metrics"]["auroc"] for r in group.to_dict("records")]
        pooled = pd.DataFrame([p for r in group["oof"] for p in r])
        auc = roc_auc_score(pooled["y"], pooled["score"])
        lo, hi = patient_bootstrap(pooled)
        acc = statistics.mean(r["metrics"]["accuracy"] for r in group.to_dict("records"))
        lines.append(
            f"| {recipe} | {seed} | {', '.join(f'{a:.3f}' for a in folds)} | "
            f"{statistics.mean(folds):.3f} ± {statistics.stdev(folds):.3f} | {auc:.3f} ({lo:.3f}-{hi:.3f}) "
            f"| {acc:.3f} | {sum(group['seconds']):.0f} |"
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
                "data": {"label_source": "folder", "classes": ["no_contrast", "contrast"]},
                "split": {"test_fraction": 1 / FOLDS, "val_fraction": 0.15},
                "preprocess": {"image_size": 128},
                "evaluate": {"positive_class": "contrast"},
            },
        )
        harness.run_recipes(
            ws, NAME, RECIPES, args.recipe, args.seeds, folds=FOLDS, extra_row=lambda ws: {"oof": oof_rows(ws)}
        )
    runs = harness.recorded(NAME)
    if runs:
        from components.common import write_text

        lines = [
            f"# SIIM CT contrast (DICOM, 54 patients): patient-level {FOLDS}-fold cross-validation",
            "",
            f"Runs recorded by `dvc exp run` in bench/quality/.work/{NAME}; machine: "
            f"{'; '.join(sorted({r['machine'] for r in runs}))}.",
            "",
            *table(runs),
            "",
            "No published baseline. Images: 512 px DICOM slices windowed with their header's "
            "WindowCenter/Width, resized to 128 px; folds are StratifiedGroupKFold over the hashed "
            "DICOM PatientID, so no patient is in two folds or two splits.",
            "",
        ]
        write_text(harness.RESULTS / f"{NAME}.md", "\n".join(lines))
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
