"""`medtune predict --explain DIR`: a Grad-CAM overlay per scan, from the checkpoint the ONNX model was
exported from.

    medtune predict models/model.onnx scans/ -o predictions.csv --explain overlays/

ONNX Runtime scores the scans; the heatmap needs the gradients of the PyTorch network, so this is
the one part of predict that imports torch, and only when asked. The checkpoint is found by content:
the `model.pt` whose sha256 is the ONNX metadata's `checkpoint_sha256` (the lineage's), looked for
beside the ONNX file, then at `models/model.pt` and `registry/models/<model id>/model.pt` under the
working directory; a file there with other bytes is not used. The overlays are computed on the
scans as predict prepared them (components/model/explain.py), for the class predict predicted, and
with the test-time augmentation the model was evaluated with.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from components.common import StageError, sha256_bytes

log = logging.getLogger("medtune.predict")

WEIGHTS = "model.pt"


def candidates(model_path: Path, sha256: str) -> list[Path]:
    """Where the checkpoint of `model_path` may be, in the order looked at (duplicates left out)."""
    found = [model_path.parent / WEIGHTS, Path("models") / WEIGHTS, Path("registry/models") / sha256[:12] / WEIGHTS]
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def find_checkpoint(model_path: Path, meta: dict[str, Any]) -> tuple[Path, bytes]:
    """The checkpoint `model_path` was exported from, and its bytes (read once: the bytes checked are
    the bytes loaded); StageError naming every place looked at and what was there otherwise."""
    expected = meta.get("checkpoint_sha256")
    if not expected:
        raise StageError(
            f"{model_path}: its metadata records no checkpoint_sha256, so the checkpoint it was exported "
            "from cannot be told from another; re-export it with `medtune export` to use --explain."
        )
    looked = []
    for path in candidates(model_path, expected):
        if not path.is_file():
            looked.append(f"{path} (not found)")
            continue
        data = path.read_bytes()
        digest = sha256_bytes(data)
        if digest == expected:
            return path, data
        looked.append(f"{path} (sha256 {digest[:12]}..., another model's)")
    raise StageError(
        f"{model_path}: --explain needs the checkpoint this model was exported from, model.pt with sha256 "
        f"{expected} (model {expected[:12]}); looked at {', '.join(looked)}. Put that model.pt beside the "
        "ONNX file (e.g. `dvc pull models/model.pt` at the model's revision)."
    )


def load_explainer(model_path: Path) -> tuple[Any, dict[str, Any]]:
    """(network, ONNX metadata) for the overlays of `model_path`'s predictions; StageError if its
    checkpoint is not found or does not fit the ONNX model's classes and input channels."""
    from components.release.onnx_runtime import read_metadata

    try:
        from components.model.explain import model_from_bytes
    except ImportError as exc:  # the slim predict image: ONNX Runtime only
        raise StageError(
            f"--explain needs torch and grad-cam, and this environment lacks {exc.name!r}: it is set up for "
            "scoring only. Run it where medtune's full requirements are installed (requirements.lock, the "
            "training image)."
        ) from None
    meta = read_metadata(model_path)
    path, data = find_checkpoint(model_path, meta)
    model, ckpt = model_from_bytes(path, data, meta["checkpoint_sha256"])
    channels = (meta.get("input") or {}).get("shape", [None, None])[1]
    if list(ckpt["classes"]) != list(meta["classes"]) or (channels is not None and ckpt["in_channels"] != channels):
        raise StageError(
            f"{path}: classes {ckpt['classes']} and {ckpt['in_channels']} input channel(s), but {model_path} has "
            f"classes {meta['classes']} and {channels}; expected the checkpoint the ONNX file was exported from."
        )
    return model, meta


def overlay_names(files: Sequence[Path]) -> list[str]:
    """`<stem>.png` per scan; a stem that two scans share gets the first 8 hex digits of the sha256 of
    the scan's path as well (`<stem>-<hash>.png`), so no overlay overwrites another."""
    counts = Counter(f.stem for f in files)
    return [
        f"{f.stem}.png" if counts[f.stem] == 1 else f"{f.stem}-{sha256_bytes(f.as_posix().encode())[:8]}.png"
        for f in files
    ]


def write_overlays(
    model: Any, meta: dict[str, Any], images: np.ndarray, targets: Sequence[int], paths: list[Path]
) -> None:
    """The overlay of each uint8 (C, H, W) image in `images` for class `targets[i]`, to `paths[i]`."""
    from components.model.explain import heatmaps, overlay, write_png
    from components.model.models import pick_device

    tta = (meta.get("metrics") or {}).get("tta") or "none"
    maps = heatmaps(model, images, np.asarray(targets), tta, pick_device())
    for image, heat, path in zip(images, maps, paths):
        write_png(overlay(image, heat), path)
