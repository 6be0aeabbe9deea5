"""One epoch of one model: a training pass (`train_one_epoch`), a validation pass (`evaluate_epoch`, or
`evaluate_regression_epoch` for a one-output regression model), and the loss both use (`make_criterion`).
`fit` (components/model/fit.py) runs them epoch after epoch.

Regression (data.task) trains on targets standardised with the train split's mean and standard
deviation (components/model/train.py); the loss is on that scale, the validation MAE in the target's
own unit."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from components.common import StageError
from components.model.metrics import auroc
from components.model.optim import Mixup
from components.params import TrainParams


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled so a balanced set gets weight 1 for every class."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return torch.tensor(counts.sum() / (num_classes * np.maximum(counts, 1)), dtype=torch.float32)


class RegressionLoss(nn.Module):
    """MSE or Huber (`train.loss`; Huber's delta `train.huber_delta` in standard deviations of the train
    targets) between a one-output head's (N, 1) outputs and (N,) standardised targets."""

    def __init__(self, loss: str, delta: float):
        super().__init__()
        self.loss = nn.HuberLoss(delta=delta) if loss == "huber" else nn.MSELoss()

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(out.float().reshape(-1), y.float())


def make_criterion(
    y_train: np.ndarray, num_classes: int, tp: TrainParams, device: torch.device, regression: bool = False
) -> nn.Module:
    """Cross-entropy, class-weighted (`train.class_weighting`) and label-smoothed as params say; with
    `regression`, `train.loss` on the standardised targets (class weights do not apply)."""
    if regression:
        return RegressionLoss(tp.loss, tp.huber_delta)
    weight = class_weights(y_train, num_classes).to(device) if tp.class_weighting else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=tp.label_smoothing)


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    # channels_last: oneDNN (CPU) and cuDNN run these convolutions faster in NHWC (1.7-1.8x on
    # CPU here, `python -m bench layout`).
    return x.to(device, non_blocking=True, memory_format=torch.channels_last)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    amp: bool = False,
    desc: str = "train",
    scheduler: Any = None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
    mixup: Mixup | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """One pass over `loader` (updating `ema` after every step); returns {loss (mean per image), images, seconds}."""
    model.train()
    total, seen, start = 0.0, 0, time.perf_counter()
    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
        x, y = _to(x, device), y.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            loss = mixup.loss(model, criterion, x, y) if mixup is not None else criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(getattr(model, "module", model))  # the model inside DDP
        total += float(loss.detach()) * len(y)
        seen += len(y)
    if seen == 0:
        raise StageError("the training loader yielded no batches; expected at least 2 training images.")
    return {"loss": total / seen, "images": seen, "seconds": time.perf_counter() - start}


@torch.inference_mode()
def _validate(
    model: nn.Module, loader: DataLoader, criterion: nn.Module, device: torch.device, amp: bool
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The mean validation loss (the training criterion), and the model's outputs and targets on the CPU."""
    model.eval()
    total, outputs, targets = 0.0, [], []
    for x, y in loader:
        x, y = _to(x, device), y.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            out = model(x).float()
        total += float(criterion(out, y)) * len(y)
        outputs.append(out.cpu())
        targets.append(y.cpu())
    y_all = torch.cat(targets)
    return total / len(y_all), torch.cat(outputs), y_all


def evaluate_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    device: torch.device,
    positive_index: int,
    amp: bool = False,
) -> dict[str, float]:
    """Validation loss (same weighted criterion as training), AUROC (nan if a class is missing) and accuracy."""
    loss, logits, labels = _validate(model, loader, criterion, device, amp)
    p, y_true = torch.softmax(logits, dim=1).numpy(), labels.numpy()
    return {
        "val_loss": loss,
        "val_auroc": auroc(y_true, p, positive_index),
        "val_accuracy": float((p.argmax(1) == y_true).mean()),
    }


def evaluate_regression_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    device: torch.device,
    target_std: float,
    amp: bool = False,
) -> dict[str, float]:
    """Validation loss (the training criterion, on standardised targets) and MAE in the target's unit
    (the standardised error times the train split's standard deviation)."""
    loss, out, y = _validate(model, loader, criterion, device, amp)
    err = (out.reshape(-1) - y.float()).abs().numpy().astype(np.float64)
    return {"val_loss": loss, "val_mae": float(err.mean() * target_std)}
