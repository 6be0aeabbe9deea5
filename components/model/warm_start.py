"""Warm starts: training starts from a registry model's weights (the champion's) instead of ImageNet's.

    # params.yaml (the retrain flow sets it to the champion's on every run; retrain.warm_start)
    train:
      init_from: 3f2a9c1e0b7d...   # sha256 of the model.pt to start from; null: ImageNet (a cold start)

The weights are named by content, not by path: `train.init_from` is the sha256 of a medtune
`model.pt`, whose first 12 hex digits are its model id, so the file is `registry/models/<id>/model.pt`
(git-ignored, like the model's ONNX). When it is missing (a fresh clone), it is fetched from the DVC
remote with `dvc get . models/model.pt --rev REV`, REV being the model's release tag or else the
commit that added its registry folder: so `dvc repro` by an engineer trains from the same bytes as the
flow did. Whatever the file's origin, it is loaded only if its sha256 equals the parameter, as tensors
only (`torch.load(weights_only=True)`), and only if its classes, input channels, image size,
architecture and ensemble size are the run's; otherwise train stops with a StageError naming them.

The freeze strategy means the same as from ImageNet, applied to the champion's network: `all` fine-tunes
all of it, `head` only its head (which is the champion's trained head, not a new one), `last_n` the
head and the last blocks; frozen BatchNorm keeps the champion's statistics, and `head_epochs` trains the
head alone first.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from components.common import StageError, atomic_path, dvc, git, load_tensors, sha256_bytes

log = logging.getLogger("medtune.warm_start")

WEIGHTS = "model.pt"  # a model's checkpoint beside its lineage in registry/models/<id>/
SOURCE = "models/model.pt"  # where train wrote it, in the DVC remote at the model's release


def weights_path(registry: str | Path, sha256: str) -> Path:
    """registry/models/<model id>/model.pt of the checkpoint whose sha256 is `sha256`."""
    return Path(registry) / "models" / sha256[:12] / WEIGHTS


def fetch(root: str | Path, model_id: str, rev: str | None = None) -> Path:
    """registry/models/<model_id>/model.pt, fetched from the DVC remote at `rev` when missing.

    `rev` defaults to the commit that added registry/models/<model_id>/lineage.json: the model's
    promotion, where dvc.lock names its model.pt. The file is renamed into place only when complete.
    """
    root = Path(root)
    path = root / "registry" / "models" / model_id / WEIGHTS
    if path.is_file():
        return path
    if rev is None:
        lineage = f"registry/models/{model_id}/lineage.json"
        rev = git(root, "log", "-1", "--diff-filter=A", "--format=%H", "--", lineage, check=False) or None
        if rev is None:
            raise StageError(
                f"{path} not found, and no commit adds {lineage}: model {model_id} was never promoted "
                "in this repository, so its weights cannot be fetched. Set train.init_from: null for a "
                "cold start, or copy that model's model.pt there."
            )
    with atomic_path(path) as tmp:
        tmp.unlink(missing_ok=True)
        dvc(root, "get", ".", SOURCE, "--rev", rev, "-o", str(tmp))
    log.info("fetched model %s's weights from the DVC remote at %s into %s", model_id, rev[:12], path)
    return path


def read_checkpoint(path: str | Path, sha256: str) -> dict[str, Any]:
    """The checkpoint at `path` as tensors and plain values, after its bytes' sha256 matched `sha256`."""
    path = Path(path)
    data = path.read_bytes()  # read once: the bytes hashed are the bytes loaded
    digest = sha256_bytes(data)
    if digest != sha256:
        raise StageError(
            f"{path}: sha256 {digest}, but train.init_from is {sha256}; the file is not the weights "
            "the parameter names (replaced or damaged). Delete it so it is fetched again, or set "
            "train.init_from to the sha256 of the model you mean."
        )
    ckpt = load_tensors(path, data, "Delete it so it is fetched again.")
    missing = [
        k
        for k in ("state_dict", "backbone", "classes", "in_channels", "image_size")
        if not isinstance(ckpt, dict) or k not in ckpt
    ]
    if missing:
        raise StageError(f"{path}: not a medtune checkpoint (missing {missing}); expected the model.pt train writes.")
    return ckpt


def mismatches(
    ckpt: dict[str, Any],
    classes: list[str],
    in_channels: int,
    image_size: int,
    arch: str,
    members: int,
    task: str = "classification",
) -> list[str]:
    """How the checkpoint differs from the run it would start (empty: it fits). A checkpoint without a
    "task" is a classifier's; a regression champion's target mean and standard deviation need not be
    the run's (the run standardises with its own train split's)."""
    have = {
        "task": ckpt.get("task", "classification"),
        "classes": list(ckpt["classes"]),
        "input channels": int(ckpt["in_channels"]),
        "image_size": int(ckpt["image_size"]),
        "backbone": ckpt["backbone"],
        "ensemble members": int(ckpt.get("members", 1)),
    }
    want = {
        "task": task,
        "classes": list(classes),
        "input channels": int(in_channels),
        "image_size": int(image_size),
        "backbone": arch,
        "ensemble members": int(members),
    }
    return [f"{k} {have[k]!r} (this run: {want[k]!r})" for k in have if have[k] != want[k]]


def start_info(ckpt_sha256: str, path: Path) -> dict[str, str]:
    """The checkpoint's `pretrained` record for a warm start (the lineage and `medtune trace` show it)."""
    mid = ckpt_sha256[:12]
    return {
        "name": f"champion {mid}",
        "source": f"warm start: {path.as_posix()}",
        "sha256": ckpt_sha256,
        "init": "warm-start",
        "model_id": mid,
        "description": f"warm start from champion {mid} (sha256 {ckpt_sha256})",
    }


def load_init(
    registry: str | Path,
    sha256: str,
    *,
    classes: list[str],
    in_channels: int,
    image_size: int,
    arch: str,
    members: int,
    task: str = "classification",
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The weights `train.init_from` names, one state_dict per ensemble member, and their `pretrained`
    record. Fetched if missing (see `fetch`); StageError unless the hash, classes, shape and backbone fit."""
    registry = Path(registry)
    path = weights_path(registry, sha256)
    if not path.is_file():
        fetch(registry.parent, sha256[:12])
    ckpt = read_checkpoint(path, sha256)
    wrong = mismatches(ckpt, classes, in_channels, image_size, arch, members, task)
    if wrong:
        raise StageError(
            f"{path}: train.init_from = {sha256[:12]}... does not fit this run: it has "
            + "; ".join(wrong)
            + ". A warm start needs the same task, the same classes in the same order, input "
            "shape, backbone and ensemble size; set train.init_from: null for a cold start."
        )
    state = ckpt["state_dict"]
    if members == 1:
        states = [state]
    else:
        states = [
            {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"members.{m}.")} for m in range(members)
        ]
    return states, start_info(sha256, path)
