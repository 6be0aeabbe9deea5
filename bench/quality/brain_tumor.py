"""brain-tumor-yesno (253 brain MRI images, messy folder): ingest accounting and test AUROC.

    python -m bench.quality.brain_tumor [--recipe NAME] [--seeds 0 1 2]

Imported with `medtune import-folders` (mixed JPEG/PNG, extension cases, sizes and colour modes),
then the pipeline with a patient-level split (the set has no patient ids: each image is its own
patient, and byte-identical images are split together). No official split or baseline.
"""

from __future__ import annotations

import sys

from bench.quality.medmnist import Dataset
from bench.quality.medmnist import main as run_dataset

DATASET = Dataset(
    name="brain_tumor",
    source="brain-tumor-yesno",
    classes=["no", "yes"],
    positive="yes",
    title="brain-tumor-yesno (253 MRI images, no official split): held-out test AUROC",
    published=[],
    # The stratified split, not the default `stable`: the recorded runs used it, so they repeat.
    params={"data": {"label_source": "csv"}, "split": {"method": "stratified"}, "preprocess": {"image_size": 128}},
    recipes={
        "params.yaml defaults @128px": {},
        "messy-photos": {"preset": "messy-photos"},
        # Histogram equalization per scan (the folder mixes exposures and sources).
        "messy-photos, equalized": {"preset": "messy-photos", "sets": {"preprocess.equalize": True}},
        # The same recipe with ingest keeping near-duplicate images (33 groups here, against 22
        # byte-identical ones) in one split: another, leak-free split, under its own label.
        "messy-photos, near-duplicates split together": {"preset": "messy-photos"},
        # The same runs on another processor: seeded CPU training is deterministic on one kind of
        # processor, and this measures how far it moves across processors. Its own label, so the
        # first processor's runs stay recorded beside it.
        "messy-photos, near-duplicates split together, rerun": {"preset": "messy-photos"},
    },
    notes=[
        "No published baseline and no official split: test = 25% of the images (patient-level "
        "StratifiedGroupKFold, byte-identical duplicates kept in one split); small, so the intervals are wide."
    ],
)


def main(argv: list[str] | None = None) -> int:
    return run_dataset(
        DATASET, argv, import_cmd=lambda src: ["medtune", "import-folders", str(src), "--out", "data/raw"]
    )


if __name__ == "__main__":
    sys.exit(main())
