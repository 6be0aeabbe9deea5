"""Train one model with one seed: the loaders, the epochs, validation and the choice of epoch.

    result = fit(x_train, y_train, x_val, y_val, num_classes, params, seed, device, use_amp)
    result["state"]    # the kept epoch's weights (CPU, NCHW); result["history"]: one row per epoch

One epoch = `train_one_epoch` (augmented training images) then `evaluate_epoch` (validation
loss, AUROC, accuracy). The epoch with the best `train.early_stopping_metric` is kept; training
stops after `train.patience` epochs without improvement. The train stage (components/model/train.py)
calls `fit` once per ensemble member and writes what it returns.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from components.common import StageError
from components.data.augment import build_transform
from components.model import distributed
from components.model.distributed import World
from components.model.metrics import auroc
from components.model.models import build_model, describe_start, freeze
from components.model.optim import Mixup, make_ema, make_optimizer, make_scheduler
from components.params import Params, TrainParams

log = logging.getLogger("medtune.train")


class ScanDataset(Dataset):
    """uint8 (N, C, H, W) images (a memmap or a tensor) -> float (C, H, W) in [0, 1], label."""

    def __init__(self, images: Any, labels: Sequence[int], transform: Any = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels.")
        self.images, self.labels, self.transform = images, np.asarray(labels, dtype=np.int64), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        # Only this one image is read from the memmap (and copied), never the whole split.
        x = torch.from_numpy(np.asarray(self.images[i], dtype=np.float32)) / 255.0
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i])


def make_loader(
    images: Any,
    labels: Sequence[int],
    batch_size: int,
    train: bool,
    transform: Any = None,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    world: World = World(),
) -> DataLoader:
    """DataLoader over uint8 images; shuffled by a seeded generator (which also seeds workers) when `train`.

    In a world of several processes, the training images are shared out by a seeded DistributedSampler
    (call `loader.sampler.set_epoch` every epoch) and `batch_size` is the per-process batch."""
    dataset = ScanDataset(images, labels, transform if train else None)
    sampler = (
        DistributedSampler(dataset, world.size, world.rank, shuffle=True, seed=seed)
        if train and world.size > 1
        else None
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed) if train and sampler is None else None,
        persistent_workers=num_workers > 0,
        # A last training batch of one image breaks BatchNorm (one value per channel on 1x1 maps).
        drop_last=train and len(sampler or dataset) % batch_size == 1,
    )


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled so a balanced set gets weight 1 for every class."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return torch.tensor(counts.sum() / (num_classes * np.maximum(counts, 1)), dtype=torch.float32)


def make_criterion(y_train: np.ndarray, num_classes: int, tp: TrainParams, device: torch.device) -> nn.Module:
    """Cross-entropy, class-weighted (`train.class_weighting`) and label-smoothed as params say."""
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
def evaluate_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    device: torch.device,
    positive_index: int,
    amp: bool = False,
) -> dict[str, float]:
    """Validation loss (same weighted criterion as training), AUROC (nan if a class is missing) and accuracy."""
    model.eval()
    total, probs, labels = 0.0, [], []
    for x, y in loader:
        x, y = _to(x, device), y.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            logits = model(x).float()
        total += float(criterion(logits, y)) * len(y)
        probs.append(torch.softmax(logits, dim=1).cpu().numpy())
        labels.append(y.cpu().numpy())
    p, y_true = np.concatenate(probs), np.concatenate(labels)
    return {
        "val_loss": total / len(y_true),
        "val_auroc": auroc(y_true, p, positive_index),
        "val_accuracy": float((p.argmax(1) == y_true).mean()),
    }


@dataclass
class Setup:
    """One model's training objects, as `setup` builds them for `fit`."""

    model: nn.Module  # the network (this process's replica under DDP)
    net: nn.Module  # what takes the training steps: `model`, or DDP around it
    selected: nn.Module  # what is validated and kept: `model`, or its moving average
    ema: torch.optim.swa_utils.AveragedModel | None
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    mixup: Mixup | None
    train_loader: DataLoader
    val_loader: DataLoader
    pretrained: dict[str, str]  # where the starting weights came from
    trainable: int


def start_model(
    tp: TrainParams, num_classes: int, in_channels: int, init: tuple[dict[str, Any], dict[str, str]] | None
) -> tuple[nn.Module, dict[str, str]]:
    """(model, pretrained record): ImageNet (or random) weights, or a warm start's `init` = (state_dict, record)."""
    # A warm start needs no ImageNet weights: the champion's replace every tensor (strictly checked).
    model, info = build_model(tp.backbone, num_classes, in_channels, tp.pretrained and init is None, tp.dropout)
    if init is None:
        return model, describe_start(info)
    try:
        model.load_state_dict(init[0])
    except RuntimeError as exc:
        raise StageError(
            f"{init[1]['source']}: its weights do not fit {model.arch} "
            f"({str(exc).splitlines()[0]}); set train.init_from: null for a cold start."
        ) from None
    return model, init[1]


def setup(
    x_train: Any,
    y_train: np.ndarray,
    x_val: Any,
    y_val: np.ndarray,
    num_classes: int,
    params: Params,
    seed: int,
    device: torch.device,
    use_amp: bool,
    world: World,
    init: tuple[dict[str, Any], dict[str, str]] | None,
) -> Setup:
    """Seed, build the model and everything that trains it. The order of the random draws (weights,
    then each process's augmentation seed) is part of what makes a run reproducible."""
    tp = params.train
    torch.manual_seed(seed)
    model, pretrained = start_model(tp, num_classes, int(x_train.shape[1]), init)
    trainable = freeze(model, tp.freeze, tp.unfreeze_last_n)
    model.to(device, memory_format=torch.channels_last)
    net: nn.Module = model
    if world.size > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        torch.manual_seed(seed + (world.rank << 32))  # each process its own augmentation draws
    ema = make_ema(model, tp.ema_decay) if tp.ema_decay > 0 else None
    criterion = make_criterion(y_train, num_classes, tp, device)
    optimizer = make_optimizer(model, tp)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    pin = device.type == "cuda"
    train_loader = make_loader(
        x_train,
        y_train,
        tp.batch_size // world.size,
        True,
        build_transform(params.augment),
        seed,
        tp.num_workers,
        pin,
        world,
    )
    val_loader = make_loader(x_val, y_val, tp.batch_size, False, None, seed, tp.num_workers, pin)
    return Setup(
        model=model,
        net=net,
        selected=ema.module if ema is not None else model,
        ema=ema,
        criterion=criterion,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, len(train_loader), tp),
        scaler=scaler,
        mixup=Mixup(tp.mixup_alpha, seed) if tp.mixup_alpha > 0 else None,
        train_loader=train_loader,
        val_loader=val_loader,
        pretrained=pretrained,
        trainable=trainable,
    )


def run_epoch(
    s: Setup, epoch: int, device: torch.device, use_amp: bool, world: World, positive_index: int
) -> tuple[dict[str, Any], dict[str, float]]:
    """Train one epoch, validate on rank 0 (every rank gets its numbers): (history row, training pass)."""
    lr = s.optimizer.param_groups[0]["lr"]
    if isinstance(s.train_loader.sampler, DistributedSampler):
        s.train_loader.sampler.set_epoch(epoch)
    tr = train_one_epoch(
        s.net,
        s.train_loader,
        s.criterion,
        s.optimizer,
        device,
        s.scaler,
        use_amp,
        f"epoch {epoch}",
        s.scheduler,
        s.ema,
        s.mixup,
        progress=world.main,
    )
    if world.size > 1:  # the loss over every process's images; rank 0 validates, all follow its decision
        loss_sum, images = distributed.total([tr["loss"] * tr["images"], tr["images"]], world, device)
        tr = {**tr, "loss": loss_sum / images, "images": int(images)}
    ev = distributed.from_main(
        evaluate_epoch(s.selected, s.val_loader, s.criterion, device, positive_index, use_amp) if world.main else None,
        world,
    )
    return {"epoch": epoch, "train_loss": tr["loss"], **ev, "lr": lr}, tr


def _improved(value: float, best: float | None, metric: str) -> bool:
    if best is None:
        return True  # the first epoch is always kept, so a checkpoint exists
    if math.isnan(value):
        return False
    if math.isnan(best):
        return True
    return value < best if metric == "val_loss" else value > best


def _nan_to_none(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x


def fit(
    x_train: Any,
    y_train: np.ndarray,
    x_val: Any,
    y_val: np.ndarray,
    num_classes: int,
    params: Params,
    seed: int,
    device: torch.device,
    use_amp: bool,
    desc: str = "",
    world: World = World(),
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    init: tuple[dict[str, Any], dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Train one model with `seed`; returns its kept weights (CPU, NCHW; rank 0's), history and counts.
    `on_epoch` gets each epoch's history row as soon as it is known (DVCLive's per-epoch log).
    `init`: (state_dict, pretrained record) of a warm start, loaded instead of the ImageNet weights."""
    tp = params.train
    s = setup(x_train, y_train, x_val, y_val, num_classes, params, seed, device, use_amp, world, init)
    log.info(
        "training %s%s (%s) on %s, seed %d: %d train / %d val images, %d trainable parameters",
        desc,
        tp.backbone,
        s.pretrained["description"],
        device,
        seed,
        len(y_train),
        len(y_val),
        s.trainable,
    )

    metric, history = tp.early_stopping_metric, []
    best_value, best_epoch, best_state, stale = None, 0, None, 0
    images_seen, seconds = 0, 0.0
    epochs = tqdm(range(1, tp.epochs + 1), desc=f"{desc}epochs", unit="epoch", disable=not world.main)
    for epoch in epochs:
        row, tr = run_epoch(s, epoch, device, use_amp, world, params.positive_index)
        images_seen, seconds = images_seen + tr["images"], seconds + tr["seconds"]
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        epochs.set_postfix(train_loss=f"{row['train_loss']:.4f}", **{metric: f"{row[metric]:.4f}"})
        log.info(
            "%sepoch %d: train_loss=%.4f val_loss=%.4f val_auroc=%.4f val_accuracy=%.4f lr=%.3g",
            desc,
            epoch,
            row["train_loss"],
            row["val_loss"],
            row["val_auroc"],
            row["val_accuracy"],
            row["lr"],
        )
        if _improved(row[metric], best_value, metric):
            best_value, best_epoch, stale = row[metric], epoch, 0
            # In-memory copy on the CPU: later epochs must not overwrite the kept weights.
            # contiguous(): the checkpoint stays in the usual NCHW layout whatever trained it.
            best_state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in s.selected.state_dict().items()}
        else:
            stale += 1
            if stale >= tp.patience:
                log.info("early stopping after epoch %d: no %s improvement for %d epoch(s)", epoch, metric, stale)
                break
    epochs.close()
    distributed.check_replicas(s.model, world, device)
    return {
        "state": best_state,
        "history": history,
        "best_epoch": best_epoch,
        "best_value": _nan_to_none(best_value),
        "epochs_run": len(history),
        "arch": s.model.arch,
        "pretrained": s.pretrained,
        "trainable": int(s.trainable),
        "total": int(sum(p.numel() for p in s.model.parameters())),
        "throughput": round(images_seen / seconds, 1) if seconds > 0 else None,
    }
