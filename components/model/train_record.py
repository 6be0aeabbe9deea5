"""What the train stage writes about a run besides DVCLive: models/model.pt (its contents, `checkpoint`,
and its bytes, `save_checkpoint`) and reports/train.json (`run_summary`)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from components.common import atomic_path, processor
from components.model.fit import Run


def run_summary(fits: list[dict[str, Any]], run: Run) -> dict[str, Any]:
    """reports/train.json without the checkpoint hash and the seconds (added once the checkpoint is written)."""
    tp, first = run.params.train, fits[0]
    per_member = ("best_epoch", "epochs_run", "best_value")
    return {
        "backbone": tp.backbone,
        "pretrained": first["pretrained"],
        "device": str(run.device),
        "amp": run.amp,
        "processes": run.world.size,
        "processor": processor(),
        "ensemble": tp.ensemble,
        "selection_metric": tp.early_stopping_metric,
        # One number for a single model; a list, one per member, for an ensemble.
        **{k: first[k] if tp.ensemble == 1 else [f[k] for f in fits] for k in per_member},
        "n_train": len(run.y_train),
        "n_val": len(run.y_val),
        "trainable_params": first["trainable"],
        "total_params": first["total"] * tp.ensemble,
        # Measurements of this run: not in the DVC outputs, which must be the same bytes every run.
        "throughput_img_s": first["throughput"],
    }


def checkpoint(
    fits: list[dict[str, Any]],
    state: dict[str, Any],
    summary: dict[str, Any],
    meta: dict[str, Any],
    run: Run,
) -> dict[str, Any]:
    """models/model.pt's contents: the weights and everything that explains them (params, preprocessing
    meta, starting weights, per-epoch history, selection). A regression model's also records the task
    and the train split's target mean and standard deviation, which turn its output into the target's
    unit (value = output * target_std + target_mean); a classifier's has no "task" key."""
    params, shape = run.params, run.x_train.shape  # the training images' (N, C, H, W)
    tp = params.train
    # classes: equal to data.classes (load_data checks), as meta's own strings: pickle writes a string
    # the checkpoint holds twice (here and in meta) once, so which objects they are shows in its bytes.
    task = (
        {"task": "regression", "target_mean": float(run.target_mean), "target_std": float(run.target_std)}
        if run.regression
        else {}
    )
    return {
        "state_dict": state,
        "members": tp.ensemble,
        "backbone": fits[0]["arch"],
        "classes": list(meta["classes"]),
        **task,
        "in_channels": int(shape[1]),
        "image_size": int(meta.get("image_size", shape[-1])),
        "params": {"train": tp.to_dict(), "augment": params.augment.to_dict()},
        "meta": meta,
        "pretrained": fits[0]["pretrained"],
        "history": [{**row, "member": m} for m, f in enumerate(fits) for row in f["history"]],
        **{k: summary[k] for k in ("best_epoch", "epochs_run")},
        "best_metric": {"name": tp.early_stopping_metric, "value": summary["best_value"]},
        "device": summary["device"],
        "processor": summary["processor"],
    }


def save_checkpoint(checkpoint: dict[str, Any], out_model: Path) -> bytes:
    """Write the checkpoint atomically; return its bytes."""
    # Serialise in memory: torch.save names the zip's inner folder after the file, so saving to the
    # random temporary name would make the bytes (and DVC's hash) differ run to run.
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    with atomic_path(out_model) as tmp:
        tmp.write_bytes(buf.getvalue())
    return buf.getvalue()
