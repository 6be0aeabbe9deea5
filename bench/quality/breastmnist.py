"""BreastMNIST (breast ultrasound, 28 px, official split) against the published results.

python -m bench.quality.breastmnist [--recipe NAME] [--seeds 0 1 2]
"""

import sys

from bench.quality.medmnist import Dataset, main

# Recipes that vary few-small-scans pin the preset values they were measured with, so they repeat
# whatever the preset holds: AdamW's weight decay at the params.yaml default (1e-4) ...
WEIGHT_DECAY_1E4 = {"train.weight_decay": 0.0001}
# ... and also no histogram equalization and an ensemble of 3.
UNEQUALIZED_3 = {**WEIGHT_DECAY_1E4, "preprocess.equalize": False, "train.ensemble": 3}

DATASET = Dataset(
    name="breastmnist",
    source="breastmnist/breastmnist.npz",
    classes=["malignant", "benign_or_normal"],
    positive="malignant",
    title="BreastMNIST (28 px breast ultrasound), official test split (n = 156)",
    # One image is in train as malignant and, byte for byte, in test as benign (found by the
    # validation stage), and 74 groups of near-duplicate images cross the official split (BUSI, the
    # source, holds several exports of one lesion); tolerated to keep the split the published figures use.
    params={"validate": {"max_duplicates": 1, "max_label_conflicts": 1, "max_near_duplicates": 74}},
    published=[
        ("ResNet-18 (28), from scratch, MedMNIST v2", "0.901", "0.863"),
        ("Google AutoML Vision, MedMNIST v2", "0.919", "—"),
    ],
    recipes={
        "params.yaml defaults @64px": {},
        "small-scans": {"preset": "small-scans"},
        "small-scans, 60 epochs": {"preset": "small-scans", "sets": {"train.epochs": 60, "train.patience": 15}},
        "small-scans, lr 1e-4, 30 epochs": {
            "preset": "small-scans",
            "sets": {"train.lr": 0.0001, "train.epochs": 30, "train.patience": 10},
        },
        "small-scans, backbone lr x0.1, 30 epochs": {
            "preset": "small-scans",
            "sets": {"train.backbone_lr_scale": 0.1, "train.epochs": 30, "train.patience": 10},
        },
        "small-scans @128px, 30 epochs": {
            "preset": "small-scans",
            "sets": {"preprocess.image_size": 128, "train.epochs": 30, "train.patience": 10},
        },
        "small-scans @128px, 30 epochs, Youden threshold": {
            "preset": "small-scans",
            "sets": {
                "preprocess.image_size": 128,
                "train.epochs": 30,
                "train.patience": 10,
                "evaluate.threshold_method": "youden",
            },
        },
        # A weight EMA, to smooth the jumps of validation AUROC on 78 images.
        "small-scans @128px, 30 epochs, EMA 0.98, Youden": {
            "preset": "small-scans",
            "sets": {
                "preprocess.image_size": 128,
                "train.epochs": 30,
                "train.patience": 10,
                "train.ema_decay": 0.98,
                "evaluate.threshold_method": "youden",
            },
        },
        "small-scans @128px, batch 16, 30 epochs, EMA 0.99, Youden": {
            "preset": "small-scans",
            "sets": {
                "preprocess.image_size": 128,
                "train.batch_size": 16,
                "train.epochs": 30,
                "train.patience": 10,
                "train.ema_decay": 0.99,
                "evaluate.threshold_method": "youden",
            },
        },
        "small-scans @96px, 30 epochs, EMA 0.98, Youden": {
            "preset": "small-scans",
            "sets": {
                "preprocess.image_size": 96,
                "train.epochs": 30,
                "train.patience": 10,
                "train.ema_decay": 0.98,
                "evaluate.threshold_method": "youden",
            },
        },
        "small-scans @224px, 30 epochs, Youden": {
            "preset": "small-scans",
            "sets": {
                "preprocess.image_size": 224,
                "train.epochs": 30,
                "train.patience": 10,
                "evaluate.threshold_method": "youden",
            },
        },
        # few-small-scans (components/presets.yaml) without equalization, with 3 members and weight
        # decay 1e-4: the recipe its label spells out.
        "small-scans @128px, batch 16, 30 epochs, ensemble of 3, Youden": {
            "preset": "few-small-scans",
            "sets": {**UNEQUALIZED_3},
        },
        # Evaluate-only variant of the ensemble above: DVC's run cache restores its train stage.
        "small-scans @128px, batch 16, 30 epochs, ensemble of 3, fixed threshold": {
            "preset": "few-small-scans",
            "sets": {**UNEQUALIZED_3, "evaluate.threshold_method": "fixed"},
        },
        "small-scans, frozen backbone (linear probe), 30 epochs": {
            "preset": "small-scans",
            "sets": {"train.freeze": "head", "train.epochs": 30, "train.patience": 10},
        },
        # A larger ImageNet backbone whose weights also install offline, and mixup.
        "few-small-scans, single model": {"preset": "few-small-scans", "sets": {**UNEQUALIZED_3, "train.ensemble": 1}},
        "few-small-scans, efficientnet_lite2": {
            "preset": "few-small-scans",
            "sets": {**UNEQUALIZED_3, "train.backbone": "efficientnet_lite2"},
        },
        "few-small-scans, efficientnet_lite2, single model": {
            "preset": "few-small-scans",
            "sets": {**UNEQUALIZED_3, "train.backbone": "efficientnet_lite2", "train.ensemble": 1},
        },
        "few-small-scans, mixup 0.4": {
            "preset": "few-small-scans",
            "sets": {**UNEQUALIZED_3, "train.mixup_alpha": 0.4},
        },
        "few-small-scans, mixup 0.4, single model": {
            "preset": "few-small-scans",
            "sets": {**UNEQUALIZED_3, "train.mixup_alpha": 0.4, "train.ensemble": 1},
        },
        # Histogram equalization per scan (ultrasound gain differs between scans), and 5 members.
        "few-small-scans, equalized": {
            "preset": "few-small-scans",
            "sets": {**WEIGHT_DECAY_1E4, "preprocess.equalize": True, "train.ensemble": 3},
        },
        "few-small-scans, equalized, single model": {
            "preset": "few-small-scans",
            "sets": {**WEIGHT_DECAY_1E4, "preprocess.equalize": True, "train.ensemble": 1},
        },
        "few-small-scans, equalized, ensemble of 5": {
            "preset": "few-small-scans",
            "sets": {**WEIGHT_DECAY_1E4, "preprocess.equalize": True, "train.ensemble": 5},
        },
        # How far the 546 scans should move the ImageNet weights, and which signal picks the epoch on
        # 78 validation scans.
        "few-small-scans, backbone lr x0.1": {
            "preset": "few-small-scans",
            "sets": {**WEIGHT_DECAY_1E4, "train.backbone_lr_scale": 0.1},
        },
        "few-small-scans, early stopping on val loss": {
            "preset": "few-small-scans",
            "sets": {**WEIGHT_DECAY_1E4, "train.early_stopping_metric": "val_loss"},
        },
        "few-small-scans, weight decay 0.05": {"preset": "few-small-scans", "sets": {"train.weight_decay": 0.05}},
        "few-small-scans, weight decay 0.05, early stopping on val loss": {
            "preset": "few-small-scans",
            "sets": {"train.weight_decay": 0.05, "train.early_stopping_metric": "val_loss"},
        },
        # 3 -> 5 members gave +0.014 and a third of the seed spread: 10 test whether that goes on.
        "few-small-scans, ensemble of 10": {"preset": "few-small-scans", "sets": {"train.ensemble": 10}},
    },
    notes=[
        "Positive class: malignant (label 0 in the .npz). AUROC does not depend on which class is positive.",
        "Source: Yang et al., MedMNIST v2, Scientific Data 2023 (figures as listed in ../shared/datasets/README.md).",
    ],
)

if __name__ == "__main__":
    sys.exit(main(DATASET))
