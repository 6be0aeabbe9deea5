"""Warm start vs cold start: epochs and seconds a retrain needs to reach the champion's validation loss.

    python -m bench warm_start

A synthetic project (components.data.demo_data: 160 patients x 3 slices, 64 px, efficientnet_lite0 from its
ImageNet weights, the default train parameters), ingested and preprocessed by the real stage functions.
The champion is a cold run of E epochs on it; its validation loss (the kept epoch's, the metric train
selects by: AUROC saturates near 1 on this data) is the target. Then 40 new patients are appended (stable
split: the old patients keep theirs) and the data prepared again. On the new data, (a) a cold start
(ImageNet) and (b) a warm start from the champion's model.pt (train.init_from, loaded through
components.model.warm_start as the train stage does) each train E epochs with the same parameters. Printed for
each run: the first epoch whose validation loss is at or below the target; the time to the target is those epochs times the cost of one epoch (the fastest epoch of either
run: both do the same work per epoch, and on shared cores the others are slowed by other processes), plus,
for the warm start, the time to load the champion's weights; then warm / cold time (target <= 0.6). Each
epoch's measured seconds are in the returned dict. A run that does not get there in E epochs is reported
as not reached (ratio None).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from components.common import sha256_file
from components.data.demo_data import generate
from components.data.ingest import ingest
from components.data.preprocess import load_meta, preprocess
from components.model import warm_start
from components.model.fit import Run, fit
from components.model.models import arch_of
from components.model.train import _split, train
from components.params import Params, parse_params

CLASSES = ["normal", "lesion"]


def _params(epochs: int) -> Params:
    return parse_params(
        {
            "data": {"classes": CLASSES},
            "preprocess": {"image_size": 64},
            "train": {"backbone": "efficientnet_lite0", "epochs": epochs, "patience": epochs, "batch_size": 32},
            "compute": {"workers": 1},
        }
    )


def _prepare(raw: Path, data: Path, params: Params) -> Path:
    ingest(raw, data, params)
    preprocess(data / "manifest.csv", raw, data / "prepared", params)
    return data / "prepared"


def _timed_fit(prepared: Path, params: Params, init: tuple[dict[str, Any], dict[str, str]] | None) -> list[dict]:
    """fit() as the train stage calls it; each epoch's history row with the seconds since the start."""
    x_train, y_train = _split(prepared, "train")
    x_val, y_val = _split(prepared, "val")
    rows: list[dict] = []
    wall = time.perf_counter()

    def record(row: dict) -> None:
        rows.append({**row, "wall_s": time.perf_counter() - wall})

    run = Run(x_train, y_train, x_val, y_val, params, torch.device("cpu"), False)
    fit(run, params.train.seed, on_epoch=record, init=init)
    return rows


def _reached(rows: list[dict], target: float) -> dict:
    hit = next((r for r in rows if r["val_loss"] <= target), None)
    walls = [r["wall_s"] for r in rows]
    return {
        "epochs": hit["epoch"] if hit else None,
        "wall_s": round(hit["wall_s"], 1) if hit else None,
        "epoch_wall_s": [round(b - a, 1) for a, b in zip([0.0, *walls], walls)],
        "val_loss": [round(r["val_loss"], 4) for r in rows],
        "val_auroc": [round(r["val_auroc"], 4) for r in rows],
    }


def bench_warm_start(patients: int = 160, new_patients: int = 40, epochs: int = 4) -> dict:
    params = _params(epochs)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw = tmp / "raw"
        generate(raw, patients, 3, 64, 0, CLASSES)
        first = _prepare(raw, tmp / "data", params)
        registry = tmp / "registry"
        champion = tmp / "champion" / "model.pt"
        record = train(first, champion, tmp / "champion" / "train.json", tmp / "champion" / "dvclive", params, registry)
        target = float(record["best_value"])  # the champion's kept validation loss
        sha = sha256_file(champion)
        (registry / "models" / sha[:12]).mkdir(parents=True)
        champion.rename(warm_start.weights_path(registry, sha))

        generate(raw, new_patients, 3, 64, 0, CLASSES, patient_offset=patients)  # new patients appended
        prepared = _prepare(raw, tmp / "data", params)
        meta = load_meta(prepared)
        loading = time.perf_counter()
        states, info = warm_start.load_init(
            registry,
            sha,
            classes=CLASSES,
            in_channels=int(meta["channels"]),
            image_size=int(meta["image_size"]),
            arch=arch_of(params.train.backbone),
            members=1,
        )
        loading = time.perf_counter() - loading
        cold = _reached(_timed_fit(prepared, params, None), target)
        warm = _reached(_timed_fit(prepared, params, (states[0], info)), target)
    # Both runs do the same work per epoch (same images, batches and network); only the epochs differ. An
    # epoch's cost is the fastest epoch of either run (the others were slowed by whatever else shared the cores).
    epoch_s = min(cold["epoch_wall_s"] + warm["epoch_wall_s"])
    result = {
        "metric": "val_loss",
        "target": round(target, 4),
        "champion_epochs": epochs,
        "patients": patients,
        "new_patients": new_patients,
        "epoch_s": epoch_s,
        "warm_load_s": round(loading, 2),
        "cold": cold,
        "warm": warm,
    }
    if cold["epochs"] and warm["epochs"]:
        result["cold_s"] = round(cold["epochs"] * epoch_s, 1)
        result["warm_s"] = round(warm["epochs"] * epoch_s + loading, 1)
        result["warm_cold_time_ratio"] = round(result["warm_s"] / result["cold_s"], 3)
    else:
        result["warm_cold_time_ratio"] = None  # one of them did not get there in E epochs: see the curves
    print(
        f"warm_start  to the champion's val loss {target:.4f} on {patients}+{new_patients} patients (lite0, 64 px, "
        f"{epoch_s} s per epoch): cold {cold['epochs'] or f'not in {epochs}'} epochs, warm {warm['epochs'] or f'not in {epochs}'} "
        f"epochs (+{loading:.2f} s loading the champion); warm/cold time {result['warm_cold_time_ratio']} (target <= 0.6)"
    )
    return result


if __name__ == "__main__":
    bench_warm_start()
