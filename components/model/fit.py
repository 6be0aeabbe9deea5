"""Train one model with one seed: the loaders, the epochs, validation and the choice of epoch.

    run = Run(x_train, y_train, x_val, y_val, params, device, amp)
    result = fit(run, seed)
    result["state"]    # the kept epoch's weights (CPU, NCHW); result["history"]: one row per epoch

One epoch = `train_one_epoch` (augmented training images) then `evaluate_epoch` (validation
loss, AUROC, accuracy; a regression's `evaluate_regression_epoch`: loss and MAE), all in
components/model/epoch.py. The epoch with the best
`train.early_stopping_metric` is kept; training stops after `train.patience` epochs without
improvement. The train stage (components/model/train.py) calls `fit` once per ensemble member and
writes what it returns.
"""

from __future__ import annotations

import logging
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
from components.model import distributed, pruning
from components.model.distributed import World
from components.model.early_stopping import EarlyStopping
from components.model.epoch import evaluate_epoch, evaluate_regression_epoch, make_criterion, train_one_epoch
from components.model.models import build_model, describe_start, freeze
from components.model.optim import Mixup, make_ema, make_optimizer, make_scheduler
from components.params import Params, TrainParams

log = logging.getLogger("medtune.train")


class ScanDataset(Dataset):
    """uint8 (N, C, H, W) images (a memmap or a tensor) -> float (C, H, W) in [0, 1], label (a class
    index; or a float32 tensor for float labels: a regression's standardised targets)."""

    def __init__(self, images: Any, labels: Sequence[int] | Sequence[float], transform: Any = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels.")
        labels = np.asarray(labels)
        dtype = np.float32 if np.issubdtype(labels.dtype, np.floating) else np.int64
        self.images, self.labels, self.transform = images, labels.astype(dtype), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        # Only this one image is read from the memmap (and copied), never the whole split.
        x = torch.from_numpy(np.asarray(self.images[i], dtype=np.float32)) / 255.0
        if self.transform is not None:
            x = self.transform(x)
        y = self.labels[i]
        # A float32 tensor, not a Python float, which the default collate would make float64.
        return x, (torch.tensor(y) if self.labels.dtype == np.float32 else int(y))


def make_loader(
    images: Any,
    labels: Sequence[int] | Sequence[float],
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


@dataclass(frozen=True)
class Run:
    """What every model of one training run shares: the training and validation images (uint8 NCHW) and
    labels, the params, where it trains, and whether with float16 autocast (`amp`). In regression
    (data.task) the labels are the targets standardised with the train split's `target_mean` and
    `target_std`."""

    x_train: Any
    y_train: np.ndarray
    x_val: Any
    y_val: np.ndarray
    params: Params
    device: torch.device
    amp: bool
    world: World = World()
    target_mean: float = 0.0
    target_std: float = 1.0

    @property
    def regression(self) -> bool:
        return self.params.data.regression

    @property
    def num_classes(self) -> int:
        """The head's width: one output in regression, else one per class."""
        return 1 if self.regression else len(self.params.data.classes)

    def validate(self, model: nn.Module, loader: DataLoader, criterion: nn.Module) -> dict[str, float]:
        """The validation pass of this task: val_loss and val_auroc, val_accuracy; or val_loss, val_mae."""
        if self.regression:
            return evaluate_regression_epoch(model, loader, criterion, self.device, self.target_std, self.amp)
        return evaluate_epoch(model, loader, criterion, self.device, self.params.positive_index, self.amp)


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


def setup(run: Run, seed: int, init: tuple[dict[str, Any], dict[str, str]] | None) -> Setup:
    """Seed, build the model and everything that trains it. The order of the random draws (weights,
    then each process's augmentation seed) is part of what makes a run reproducible."""
    tp, device, world = run.params.train, run.device, run.world
    torch.manual_seed(seed)
    model, pretrained = start_model(tp, run.num_classes, int(run.x_train.shape[1]), init)
    trainable = freeze(model, tp.freeze, tp.unfreeze_last_n)
    model.to(device, memory_format=torch.channels_last)
    net: nn.Module = model
    if world.size > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        torch.manual_seed(seed + (world.rank << 32))  # each process its own augmentation draws
    ema = make_ema(model, tp.ema_decay) if tp.ema_decay > 0 else None
    criterion = make_criterion(run.y_train, run.num_classes, tp, device, run.regression)
    optimizer = make_optimizer(model, tp)
    scaler = torch.amp.GradScaler("cuda", enabled=run.amp)
    train_loader, val_loader = _loaders(run, seed)
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


def _loaders(run: Run, seed: int) -> tuple[DataLoader, DataLoader]:
    """(training loader: augmented, shuffled, this process's share of each batch; validation loader)."""
    tp, pin, world = run.params.train, run.device.type == "cuda", run.world
    transform = build_transform(run.params.augment)
    train_loader = make_loader(
        run.x_train, run.y_train, tp.batch_size // world.size, True, transform, seed, tp.num_workers, pin, world
    )
    return train_loader, make_loader(run.x_val, run.y_val, tp.batch_size, False, None, seed, tp.num_workers, pin)


def run_epoch(s: Setup, run: Run, epoch: int) -> tuple[dict[str, Any], dict[str, float]]:
    """Train one epoch, validate on rank 0 (every rank gets its numbers): (history row, training pass)."""
    device, world = run.device, run.world
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
        run.amp,
        f"epoch {epoch}",
        s.scheduler,
        s.ema,
        s.mixup,
        progress=world.main,
    )
    if world.size > 1:  # the loss over every process's images; rank 0 validates, all follow its decision
        loss_sum, images = distributed.total([tr["loss"] * tr["images"], tr["images"]], world, device)
        tr = {**tr, "loss": loss_sum / images, "images": int(images)}
    ev = distributed.from_main(run.validate(s.selected, s.val_loader, s.criterion) if world.main else None, world)
    return {"epoch": epoch, "train_loss": tr["loss"], **ev, "lr": lr}, tr


def fit(
    run: Run,
    seed: int,
    desc: str = "",
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    init: tuple[dict[str, Any], dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Train one model with `seed`; returns its kept weights (CPU, NCHW; rank 0's), history and counts.
    `on_epoch` gets each epoch's history row as soon as it is known (DVCLive's per-epoch log).
    `init`: (state_dict, pretrained record) of a warm start, loaded instead of the ImageNet weights."""
    tp = run.params.train
    s = setup(run, seed, init)
    log.info(
        "training %s%s (%s) on %s, seed %d: %d train / %d val images, %d trainable parameters",
        desc,
        tp.backbone,
        s.pretrained["description"],
        run.device,
        seed,
        len(run.y_train),
        len(run.y_val),
        s.trainable,
    )
    kept, history = EarlyStopping(tp.early_stopping_metric, tp.patience), []
    images_seen, seconds = 0, 0.0
    epochs = tqdm(range(1, tp.epochs + 1), desc=f"{desc}epochs", unit="epoch", disable=not run.world.main)
    for epoch in epochs:
        row, tr = run_epoch(s, run, epoch)
        images_seen, seconds = images_seen + tr["images"], seconds + tr["seconds"]
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        epochs.set_postfix(train_loss=f"{row['train_loss']:.4f}", **{kept.metric: f"{row[kept.metric]:.4f}"})
        _log_row(row, desc)
        # `|`, not `or`: the kept epoch is chosen, and a tuning trial (pruning.py) told, every epoch.
        if kept.stop_after(row, s.selected) | pruning.should_stop(row):
            break
    epochs.close()
    distributed.check_replicas(s.model, run.world, run.device)
    return _result(s, history, kept, round(images_seen / seconds, 1) if seconds > 0 else None)


def _log_row(row: dict[str, Any], desc: str) -> None:
    if "val_mae" in row:  # regression
        log.info(
            "%sepoch %d: train_loss=%.4f val_loss=%.4f val_mae=%.4g lr=%.3g",
            desc,
            row["epoch"],
            row["train_loss"],
            row["val_loss"],
            row["val_mae"],
            row["lr"],
        )
        return
    log.info(
        "%sepoch %d: train_loss=%.4f val_loss=%.4f val_auroc=%.4f val_accuracy=%.4f lr=%.3g",
        desc,
        row["epoch"],
        row["train_loss"],
        row["val_loss"],
        row["val_auroc"],
        row["val_accuracy"],
        row["lr"],
    )


def _result(s: Setup, history: list[dict[str, Any]], kept: EarlyStopping, throughput: float | None) -> dict[str, Any]:
    """What `fit` returns: the kept weights and epoch, the history, the model's description and counts."""
    return {
        "state": kept.state,
        "history": history,
        "best_epoch": kept.epoch,
        "best_value": kept.best_value,
        "epochs_run": len(history),
        "arch": s.model.arch,
        "pretrained": s.pretrained,
        "trainable": int(s.trainable),
        "total": int(sum(p.numel() for p in s.model.parameters())),
        "throughput": throughput,
    }
