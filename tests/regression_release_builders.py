"""Regression inputs for the release side (export, predict, challenger, card, trace), made on the spot:
a data/prepared folder with targets, a one-output random-weight checkpoint in train's format, and the
reports evaluate writes for it (evaluation.json, metrics.json, gate.json as docs/regression's contract
gives them), so these tests need no regression train or evaluate.

    from tests.regression_release_builders import make_regression_project
    p = make_regression_project(tmp_path, params)    # then run_export(p, params)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from components.common import SPLITS, hash_patient, sha256_file
from components.data.manifest import target_stats
from components.params import Params, parse_params
from tests.builders import RAW_PATIENT

TARGET_MEAN, TARGET_STD = 61.5, 12.25  # e.g. a diameter in mm: far from 0 and 1, so a missing de-standardisation shows
PER_SPLIT = {"train": 6, "val": 4, "test": 6}


def regression_params(**over) -> Params:
    """Regression parameters for a random-weight model: the gates open (an R^2 below 0 passes)."""
    return parse_params(
        {
            "data": {"task": "regression", "label_source": "csv"},
            "evaluate": {"bootstrap": 40, "gate": {"min_r2": None, "max_mae": None}, **over},
            "retrain": {"compare_metric": "mae"},
        }
    )


def targets(split: str, n: int) -> np.ndarray:
    return np.round(TARGET_MEAN + TARGET_STD * np.linspace(-1.5, 1.5, n) + (SPLITS.index(split) * 0.25), 3)


def make_regression_prepared(root: Path, per_split: dict[str, int] = PER_SPLIT, size: int = 32, channels: int = 1):
    """data/prepared as preprocess writes it in regression: {split}.npy (a bright square whose side grows
    with the target), index.csv with a float `target` and label_index 0, meta.json with task and target_stats."""
    import pandas as pd

    rng = np.random.default_rng(7)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n in per_split.items():
        y = targets(split, n)
        images = rng.integers(0, 60, size=(n, channels, size, size), dtype=np.uint8)
        for i, t in enumerate(y):
            side = int(np.clip(4 + (t - 30) / 4, 2, size - 2))
            images[i, :, 1 : 1 + side, 1 : 1 + side] = 220
            rows.append(
                {
                    "split": split,
                    "row": i,
                    "path": f"{split}/{i}.png",
                    "sha256": f"{split}{i}".ljust(64, "0"),
                    "label": repr(float(t)),
                    "label_index": 0,
                    "patient": hash_patient(f"{RAW_PATIENT}-{split}-{i}", b"salt"),
                    "target": float(t),
                }
            )
        np.save(root / f"{split}.npy", images)
    pd.DataFrame(rows).to_csv(root / "index.csv", index=False)
    stats = target_stats([r["label"] for r in rows], [r["split"] for r in rows])  # as preprocess records them
    meta = {
        "task": "regression",
        "classes": [],
        "target_stats": stats,
        "image_size": size,
        "channels": channels,
        "window": "header",
        "resize": "bilinear",
        "input": "uint8 NCHW",
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def make_regression_checkpoint(
    path: Path, channels: int = 1, seed: int = 0, members: int = 1, mean=TARGET_MEAN, std=TARGET_STD
):
    """A regression checkpoint in train's format: one output, random `none`-backbone (resnet18) weights."""
    import torch

    from components.model.models import architecture

    torch.manual_seed(seed)
    model = architecture("resnet18", 1, channels, members)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "task": "regression",
            "target_mean": float(mean),
            "target_std": float(std),
            "state_dict": model.state_dict(),
            "members": members,
            "backbone": "resnet18",
            "classes": [],
            "in_channels": channels,
            "image_size": 32,
            "params": {"train": {"freeze": "all", "optimizer": "adamw", "lr": 1e-3, "seed": seed}, "augment": {}},
            "pretrained": {"name": "none", "source": "random init (resnet18 architecture)", "sha256": "none"},
            "history": [],
            "best_epoch": 1,
            "epochs_run": 1,
            "best_metric": {"name": "val_mae", "value": 9.0},
            "device": "cpu",
            "processor": "Test Processor 9000",
        },
        path,
    )
    return path


def torch_values(ckpt_path: Path, images: np.ndarray, tta: str = "none") -> np.ndarray:
    """The checkpoint's values on uint8 `images`, computed here without export's code: head * std + mean,
    the head averaged over the image and its mirror with tta hflip."""
    import torch

    from components.model.models import architecture

    ckpt = torch.load(ckpt_path, weights_only=True)
    model = architecture(ckpt["backbone"], 1, ckpt["in_channels"], ckpt["members"])
    model.load_state_dict(ckpt["state_dict"])
    x = torch.from_numpy(np.asarray(images, np.float32) / 255.0)
    with torch.inference_mode():
        head = model.eval()(x)
        if tta == "hflip":
            head = (head + model(torch.flip(x, dims=[3]))) / 2
    return (head * ckpt["target_std"] + ckpt["target_mean"]).numpy()


def evaluation_record(y: np.ndarray, pred: np.ndarray, tta: str = "none", probe_mae: float | None = None) -> dict:
    """reports/evaluation.json of a regression, as the contract gives it (intervals stand-ins, not a bootstrap)."""
    err = pred - y
    mae, rmse = float(np.abs(err).mean()), float(np.sqrt((err**2).mean()))
    r2 = float(1 - (err**2).sum() / ((y - y.mean()) ** 2).sum())
    record = {
        "task": "regression",
        "n_test": len(y),
        "tta": tta,
        "mae": mae,
        "mae_ci": [0.8 * mae, 1.2 * mae],
        "rmse": rmse,
        "rmse_ci": [0.8 * rmse, 1.2 * rmse],
        "r2": r2,
        "r2_ci": [r2 - 0.5, r2 + 0.1],
        "bootstrap_resamples": 40,
    }
    if probe_mae is not None:
        record["linear_probe"] = {
            "start": {"init": "random", "model_start": "random", "description": "random init (resnet18)"},
            "alpha": 1.0,
            "mae": probe_mae,
            "mae_ci": [0.9 * probe_mae, 1.1 * probe_mae],
            "mae_gain": probe_mae - mae,
            "mae_gain_ci": [probe_mae - mae - 1.0, probe_mae - mae + 1.0],
            "mae_gain_bootstrap_valid": 40,
        }
    return record


def metrics_numbers(record: dict) -> dict:
    """reports/metrics.json: the record's numbers, intervals as <name>_ci_low/_high."""
    out = {}
    for k in ("mae", "rmse", "r2"):
        out[k], (out[f"{k}_ci_low"], out[f"{k}_ci_high"]) = record[k], record[f"{k}_ci"]
    out["n_test"] = record["n_test"]
    probe = record.get("linear_probe")
    if probe:
        out["probe_mae"], out["mae_gain"] = probe["mae"], probe["mae_gain"]
        out["mae_gain_ci_low"], out["mae_gain_ci_high"] = probe["mae_gain_ci"]
    return out


def make_regression_project(root: Path, tta: str = "none", probe_mae: float | None = 20.0, seed: int = 0) -> dict:
    """Everything export reads for a regression model; reports computed from the checkpoint's own values."""
    import pandas as pd

    root = Path(root)
    prepared = make_regression_prepared(root / "data" / "prepared")
    ckpt = make_regression_checkpoint(root / "models" / "model.pt", seed=seed)
    index = pd.read_csv(prepared / "index.csv")
    y = index.loc[index["split"] == "test", "target"].to_numpy()
    pred = torch_values(ckpt, np.load(prepared / "test.npy"), tta)[:, 0]
    record = evaluation_record(y, pred, tta, probe_mae)
    reports = root / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "evaluation.json").write_text(json.dumps(record))
    (reports / "metrics.json").write_text(json.dumps(metrics_numbers(record)))
    gate = {
        "passed": True,
        "reasons": [f"r2 {round(record['r2'], 4)} >= min_r2 -10.0"],
        "failed": [],
        "thresholds": {"min_r2": -10.0, "max_mae": None},
        "metrics": {"r2": record["r2"], "mae": record["mae"]},
        "checkpoint_sha256": sha256_file(ckpt),
    }
    (reports / "gate.json").write_text(json.dumps(gate))
    (reports / "validation.json").write_text(json.dumps({"success": True, "suite": "manifest", "expectations": []}))
    manifest = root / "data" / "manifest.json"
    manifest.write_text(
        json.dumps(
            {
                "data_version": "d41d8cd98f00b204e9800998ecf8427e.dir",
                "content_hash": "cd" * 32,
                "n_images": sum(PER_SPLIT.values()),
                "n_unreadable": 0,
                "split": {"method": "stratified-group", "seed": 42},
            }
        )
    )
    manifest.with_suffix(".csv").write_text("path,sha256,label,patient\ntest/0.png,00,61.5,0123456789abcdef\n")
    return {
        "model": ckpt,
        "prepared": prepared,
        "reports": reports,
        "out": root / "models",
        "manifest": manifest,
        "y": y,
    }
