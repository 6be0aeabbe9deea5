"""How a training step updates the weights: the optimizer and its two learning rates, the per-batch
learning-rate schedule, the moving average of the weights, and mixup.

    optimizer = make_optimizer(model, params.train)
    scheduler = make_scheduler(optimizer, len(train_loader), params.train)   # step() after every batch
    ema = make_ema(model, params.train.ema_decay)                           # update_parameters() likewise

`params.train` has been validated when it reaches here (components/params.py): its option values
(optimizer, scheduler) are known to be ones these functions implement.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from components.params import TrainParams


def make_optimizer(model: nn.Module, tp: TrainParams) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters: the head at `lr`, the backbone at lr * backbone_lr_scale."""
    head = [p for p in model.head.parameters() if p.requires_grad]
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": head, "lr": tp.lr}]
    if body:
        groups.append({"params": body, "lr": tp.lr * tp.backbone_lr_scale})
    if tp.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tp.lr, momentum=tp.momentum, weight_decay=tp.weight_decay)
    return torch.optim.AdamW(groups, lr=tp.lr, weight_decay=tp.weight_decay)  # "adamw"


def lr_factor(step: int, steps_per_epoch: int, tp: TrainParams, backbone: bool = False) -> float:
    """Multiplier of a group's base learning rate before optimizer step `step` (0-based).

    Linear warm-up over `warmup_epochs`, then `scheduler`: cosine decays to 0 at the end of
    `epochs`, step multiplies by `gamma` every `step_size` epochs, none keeps it. Per batch, not per
    epoch, so a warm-up shorter than an epoch and a smooth cosine both work. The backbone's factor
    is 0 for the first `head_epochs`, then ramps up over its own `warmup_epochs`.
    """
    warmup = round(tp.warmup_epochs * steps_per_epoch)
    if backbone and tp.head_epochs > 0:
        start = round(tp.head_epochs * steps_per_epoch)
        if step < start:
            return 0.0
        return lr_factor(step, steps_per_epoch, tp) * min(1.0, (step - start + 1) / (warmup + 1))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if tp.scheduler == "cosine":
        total = max(tp.epochs * steps_per_epoch - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total) / total))
    if tp.scheduler == "step":
        return tp.gamma ** (step // steps_per_epoch // tp.step_size)
    return 1.0  # "none"


def make_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int, tp: TrainParams) -> Any:
    """Stepped after every optimizer step; see `lr_factor` (groups as `make_optimizer`: head, then backbone)."""
    factors = [
        lambda step, g=g: lr_factor(step, steps_per_epoch, tp, backbone=g > 0)
        for g in range(len(optimizer.param_groups))
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def make_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """A copy of `model` whose weights and BatchNorm statistics follow an exponential moving average.

    The decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates (as timm's
    ModelEma does), so the average is not dominated by the untrained head of step 0.
    """

    def average(avg: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        if not avg.is_floating_point():
            return current  # BatchNorm's num_batches_tracked: a counter, not a weight
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        return avg.lerp(current, 1.0 - d)

    return torch.optim.swa_utils.AveragedModel(model, avg_fn=average, use_buffers=True)


class Mixup:
    """mixup as in the paper's reference code (facebookresearch/mixup-cifar10): blend the batch with
    a permutation of itself and blend the two losses, so class weights and label smoothing still
    apply to integer targets; a regression's float targets are blended like the images. Its own seeded
    generators leave the global RNG (and so the runs with mixup off) untouched."""

    def __init__(self, alpha: float, seed: int):
        self.alpha = alpha
        self.rng = np.random.default_rng(seed)
        self.perm = torch.Generator().manual_seed(seed)

    def loss(self, model: nn.Module, criterion: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lam = float(self.rng.beta(self.alpha, self.alpha))
        perm = torch.randperm(len(y), generator=self.perm).to(y.device)
        out = model(lam * x + (1 - lam) * x[perm])
        if y.is_floating_point():  # regression: the targets are blended like the images
            return criterion(out, lam * y + (1 - lam) * y[perm])
        return lam * criterion(out, y) + (1 - lam) * criterion(out, y[perm])
