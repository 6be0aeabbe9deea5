"""Grad-CAM heatmaps: where in a scan the model found the evidence for the class it predicted.

    from components.model.explain import heatmaps, overlay, write_png
    maps = heatmaps(model, images, targets, tta="none", device=device)   # (N, H, W) in [0, 1]
    write_png(overlay(images[0], maps[0]), Path("x.png"))

Grad-CAM (the `grad-cam` package) weights a convolutional block's feature maps by the mean gradient
of the target class's logit and keeps the positive part: the regions that raised that logit. The
block is the backbone's last convolutional block (resnet's `layer4[-1]`, EfficientNet-Lite's
`conv_head`) when its map has at least 4 x 4 cells, else the last block that does (`target_layer`:
on 64 px scans, the stride-16 block). An ensemble's map is the mean of its members' maps, and with
`tta: hflip` each map is also averaged with the mirrored image's map mirrored back: the heatmap
follows the logits the deployed model averages. The target is the predicted class, so a heatmap
answers "why this answer" for right and wrong answers alike.

The evaluate stage explains a sample of the test split (`write_test_samples`, into
`reports/explanations/`; a regression's `write_regression_samples`: the single output's map, for the
test images with the largest and the smallest errors); `medtune predict --explain DIR` explains each
scan it scores. An overlay PNG is the scan beside the scan under the heatmap (jet colour map),
upscaled (nearest neighbour) to at least MIN_SIDE pixels, written with Pillow without a time or
version stamp: byte-reproducible.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from components.common import StageError, atomic_path, load_tensors, replace_dir, sha256_bytes, write_json
from components.model.models import EFFICIENTNETS, Classifier, Ensemble, architecture, n_outputs
from components.params import Params

log = logging.getLogger("medtune.explain")

BATCH_SIZE = 16  # images per Grad-CAM pass; does not change the maps
MIN_GRID = 4  # the target layer's feature map is at least this many cells a side (see target_layer)
MIN_SIDE = 192  # overlays are upscaled to at least this height (a 64 px scan is hard to read)
INDEX = "index.json"
BINARY_GROUPS = {  # group -> (actual is positive, predicted positive)
    "tp": (True, True),
    "fp": (False, True),
    "fn": (True, False),
    "tn": (False, False),
}


# ---------------------------------------------------------------------------------------------
# Heatmaps
# ---------------------------------------------------------------------------------------------


def target_layer(model: Classifier, image_size: int) -> tuple[str, nn.Module]:
    """(name, module) of the backbone block Grad-CAM reads: the last one whose feature map is at least
    MIN_GRID x MIN_GRID on `image_size` inputs (blocks of stride 32, 16, 8; the last convolutional block
    from 128 px up). At 64 px the last block's map is 2 x 2: one cell per quadrant, each seeing the whole
    image, and on a square in one quadrant its heatmap pointed elsewhere, where the stride-16 block's
    put 0.8-0.9 of its mass in the right quadrant (tests/test_explain.py)."""
    net = model.backbone
    if model.arch.startswith("resnet"):
        # layer4's last block: the standard Grad-CAM layer of a resnet
        blocks = [("layer4.-1", net.layer4[-1]), ("layer3.-1", net.layer3[-1]), ("layer2.-1", net.layer2[-1])]
    elif model.arch in EFFICIENTNETS:
        # conv_head: the last convolution, before the BatchNorm + ReLU6 that would zero the gradient
        # wherever a feature saturates; blocks 4 and 2 end the stride-16 and stride-8 stages.
        blocks = [("conv_head", net.conv_head), ("blocks.4", net.blocks[4]), ("blocks.2", net.blocks[2])]
    else:
        raise ValueError(f"explain: no Grad-CAM target layer for architecture {model.arch!r}.")
    for (name, module), stride in zip(blocks, (32, 16, 8)):
        if image_size // stride >= MIN_GRID:
            return f"backbone.{name}", module
    return f"backbone.{name}", module


def _members(model: Classifier | Ensemble) -> list[Classifier]:
    return list(model.members) if isinstance(model, Ensemble) else [model]


def _grad_cam(member: Classifier, x: torch.Tensor, targets: list[int]) -> np.ndarray:
    """One classifier's Grad-CAM maps (N, H, W) of `targets` for the float (N, C, H, W) batch `x`."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = GradCAM(member, [target_layer(member, min(x.shape[-2:]))[1]])
    try:
        return cam(x, [ClassifierOutputTarget(int(t)) for t in targets])
    finally:
        cam.activations_and_grads.release()  # its hooks; its __exit__ would swallow an IndexError


def heatmaps(
    model: Classifier | Ensemble,
    images: np.ndarray,
    targets: np.ndarray,
    tta: str = "none",
    device: Any = "cpu",
    batch_size: int = BATCH_SIZE,
) -> np.ndarray:
    """Grad-CAM maps, float32 (N, H, W) in [0, 1], of uint8 (N, C, H, W) `images` for class `targets`.

    The mean over the ensemble's members (and over the image and its mirror with `tta: hflip`).
    """
    if len(images) != len(targets):
        raise ValueError(f"explain: {len(images)} images but {len(targets)} target classes.")
    model = model.to(device).eval()
    model.requires_grad_(True)  # Grad-CAM needs the gradient at the target layer, frozen or not
    out = np.zeros((len(images), *images.shape[2:]), dtype=np.float32)
    members = _members(model)
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[start : start + batch_size])).to(device=device, dtype=torch.float32)
        x = x / 255.0
        t = [int(c) for c in targets[start : start + batch_size]]
        maps = [_grad_cam(m, x, t) for m in members]
        if tta == "hflip":
            maps += [_grad_cam(m, torch.flip(x, dims=[3]), t)[:, :, ::-1] for m in members]
        out[start : start + len(x)] = np.mean(maps, axis=0)
    return out


def overlay(image: np.ndarray, heat: np.ndarray, min_side: int = MIN_SIDE) -> np.ndarray:
    """uint8 RGB (H', 2W', 3): the uint8 (C, H, W) scan, and beside it the scan under `heat` (H, W)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image[:3]
    rgb = np.ascontiguousarray(rgb.transpose(1, 2, 0))
    cam = show_cam_on_image(rgb.astype(np.float32) / 255.0, np.clip(heat, 0, 1), use_rgb=True)
    both = np.concatenate([rgb, cam], axis=1)
    k = max(1, math.ceil(min_side / both.shape[0]))
    return np.kron(both, np.ones((k, k, 1), dtype=np.uint8)) if k > 1 else both


def write_png(rgb: np.ndarray, path: Path) -> None:
    """`rgb` as a PNG, atomically; Pillow writes no time or version chunk, so equal arrays give equal bytes."""
    with atomic_path(path) as tmp:
        Image.fromarray(rgb, mode="RGB").save(tmp, format="PNG")


# ---------------------------------------------------------------------------------------------
# The evaluate stage's sample of the test split
# ---------------------------------------------------------------------------------------------


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def groups(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], positive_index: int) -> dict[str, np.ndarray]:
    """Group name -> mask over the images. Binary: tp, fp, fn, tn for the positive class; more classes:
    `<class>-correct` and `<class>-wrong` (images of that class, predicted right or not) per class."""
    if len(classes) == 2:
        actual, called = y_true == positive_index, y_pred == positive_index
        return {g: (actual == a) & (called == c) for g, (a, c) in BINARY_GROUPS.items()}
    out = {}
    for i, c in enumerate(classes):
        out[f"{_slug(c)}-correct"] = (y_true == i) & (y_pred == i)
        out[f"{_slug(c)}-wrong"] = (y_true == i) & (y_pred != i)
    return out


def choose(masks: dict[str, np.ndarray], confidence: np.ndarray, paths: list[str], per_group: int) -> dict[str, list]:
    """Up to `per_group` rows of each group: the most confident first (for an error group the
    most confident errors, the most telling ones), ties by path. No randomness: the same test
    predictions always give the same sample. Confidence is rounded to 6 decimals, as the CSVs
    round it, so float noise below that cannot reorder the sample."""
    conf = np.round(confidence, 6)
    return {
        g: sorted(np.flatnonzero(m).tolist(), key=lambda i: (-conf[i], paths[i]))[:per_group] for g, m in masks.items()
    }


def write_test_samples(
    out_dir: Path,
    model: Classifier | Ensemble,
    images: np.ndarray,
    index: Any,
    probs: np.ndarray,
    y_pred: np.ndarray,
    params: Params,
    device: Any,
) -> dict[str, Any]:
    """Overlays of `evaluate.explain_per_group` test images per group (`groups`, `choose`) in
    `out_dir`, named `<group>-<sha256(path)[:12]>.png` (not the path, which may hold a patient's name
    or number), and `index.json` listing each (file, group, path, label, predicted, probability of the
    predicted class) with the group sizes; returns the index. `images`, `index`, `probs` and `y_pred`
    are the test split as evaluate scored it. The folder is built beside `out_dir` and renamed over
    it whole, so a stop leaves the old folder or the new one. 0 per group writes an index without images."""
    classes, per_group = list(params.data.classes), params.evaluate.explain_per_group
    y_true = index["label_index"].to_numpy().astype(np.int64)
    paths = [str(p) for p in index["path"]]
    confidence = probs[np.arange(len(probs)), y_pred]
    masks = groups(y_true, y_pred, classes, params.positive_index)
    chosen = choose(masks, confidence, paths, per_group)
    return _explain(
        out_dir,
        model,
        images,
        paths,
        {g: chosen[g] for g in masks},
        {g: int(m.sum()) for g, m in masks.items()},
        y_pred,
        "the predicted class's logit",
        lambda i: {
            "label": classes[y_true[i]],
            "predicted": classes[y_pred[i]],
            "probability": round(float(confidence[i]), 6),
        },
        params,
        device,
    )


def _explain(
    out_dir: Path,
    model: Classifier | Ensemble,
    images: np.ndarray,
    paths: list[str],
    chosen: dict[str, list[int]],
    sizes: dict[str, int],
    targets: np.ndarray,
    target: str,
    details: Callable[[int], dict[str, Any]],
    params: Params,
    device: Any,
) -> dict[str, Any]:
    """Grad-CAM of output `targets[i]` (described as `target`) for the test rows `chosen` per group (of
    `sizes` images), each listed in index.json with its file, group, path and `details(i)`."""
    pairs = [(g, i) for g in chosen for i in chosen[g]]
    rows = [i for _, i in pairs]  # in the order of `pairs`, so maps[n] is pair n's
    tta = params.evaluate.tta
    maps = heatmaps(model, images[rows], targets[rows], tta, device) if rows else None
    layer = target_layer(_members(model)[0], min(images.shape[-2:]))[0]
    record = {
        "method": "grad-cam",
        "target": target,
        "target_layer": layer if isinstance(model, Classifier) else f"members.*.{layer} (maps averaged)",
        "tta": tta,
        "per_group": params.evaluate.explain_per_group,
        "groups": {g: {"images": sizes[g], "explained": len(chosen[g])} for g in chosen},
        "images": [],
    }
    entries = [
        (
            {"file": f"{g}-{sha256_bytes(paths[i].encode())[:12]}.png", "group": g, "path": paths[i], **details(i)},
            np.asarray(images[i]),
            maps[n],
        )
        for n, (g, i) in enumerate(pairs)
    ]
    return _write_folder(out_dir, record, entries)


def _write_folder(out_dir: Path, record: dict[str, Any], entries: list[tuple[dict[str, Any], Any, Any]]) -> dict:
    """`out_dir` as the overlays of `entries` ((index entry naming its file, uint8 image, heatmap)) and
    `record` with the entries as its images, in index.json; built beside it and renamed over it whole."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        for entry, image, heat in entries:
            write_png(overlay(image, heat), tmp / entry["file"])
            record["images"].append(entry)
        write_json(tmp / INDEX, record)
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("explained %d test image(s) with Grad-CAM in %s: %s", len(entries), out_dir, record["groups"])
    return record


def write_regression_samples(
    out_dir: Path,
    model: Classifier | Ensemble,
    images: np.ndarray,
    index: Any,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    params: Params,
    device: Any,
) -> dict[str, Any]:
    """A regression's `write_test_samples`: Grad-CAM of its one output (the regions that raised the
    predicted value) for up to `evaluate.explain_per_group` test images with the largest absolute
    errors (group `largest-error`) and as many with the smallest (`smallest-error`), ties by path;
    index.json lists each with its target, prediction and error (prediction - target)."""
    per_group = params.evaluate.explain_per_group
    paths = [str(p) for p in index["path"]]
    error = np.round(np.asarray(y_pred, dtype=np.float64) - np.asarray(y_true, dtype=np.float64), 6)
    by_error = sorted(range(len(paths)), key=lambda i: (-abs(error[i]), paths[i]))
    largest = by_error[:per_group]
    taken = set(largest)
    rest = sorted((i for i in range(len(paths)) if i not in taken), key=lambda i: (abs(error[i]), paths[i]))
    chosen = {"largest-error": largest, "smallest-error": rest[:per_group]}
    return _explain(
        out_dir,
        model,
        images,
        paths,
        chosen,
        {g: len(paths) for g in chosen},
        np.zeros(len(paths), dtype=np.int64),
        "the model's one output (the predicted value)",
        lambda i: {"target": float(y_true[i]), "predicted": round(float(y_pred[i]), 6), "error": float(error[i])},
        params,
        device,
    )


# ---------------------------------------------------------------------------------------------
# A checkpoint whose bytes were checked (predict --explain)
# ---------------------------------------------------------------------------------------------


def model_from_bytes(path: Path, data: bytes, sha256: str) -> tuple[Classifier | Ensemble, dict[str, Any]]:
    """The network of the checkpoint `data` (the bytes of `path`), loaded as tensors only, after their
    sha256 matched `sha256`; StageError naming the file otherwise."""
    digest = sha256_bytes(data)
    if digest != sha256:
        raise StageError(f"{path}: sha256 {digest}, expected {sha256}; not the checkpoint the model was exported from.")
    ckpt = load_tensors(path, data, "Expected the model.pt that `medtune train` wrote.")
    missing = [
        k for k in ("state_dict", "backbone", "classes", "in_channels") if not isinstance(ckpt, dict) or k not in ckpt
    ]
    if missing:
        raise StageError(f"{path}: not a medtune checkpoint (missing {missing}); expected the model.pt train writes.")
    model = architecture(ckpt["backbone"], n_outputs(ckpt), int(ckpt["in_channels"]), int(ckpt.get("members", 1)))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt
