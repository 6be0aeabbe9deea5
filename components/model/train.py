"""Stage 5: fine-tune a pretrained backbone with a new head on the prepared images.

    medtune train      # data/prepared -> models/model.pt, dvclive/ (per-epoch metrics), reports/train.json

One epoch = `train_one_epoch` (augmented training images) then `evaluate_epoch` (validation
loss, AUROC, accuracy). The epoch with the best `train.early_stopping_metric` is kept and saved;
training stops after `train.patience` epochs without improvement. Seeded and deterministic on
CPU: the same data and params give the same weights on the same kind of processor (another
processor's floating-point kernels round differently, and training amplifies it: docs/quality.md;
train.json and the checkpoint record the processor). On a GPU it uses CUDA and, with
`train.amp`, float16 autocast with a GradScaler. With `train.processes` > 1 it trains data-parallel
(DDP) under torchrun: each process a share of every batch, rank 0 validates and writes
(components/model/distributed.py).

With `train.init_from` (the sha256 of a registry model.pt; the retrain flow sets the champion's) the
network starts from those weights instead of ImageNet's: a warm start (components/model/warm_start.py).

The checkpoint is a plain dict of tensors, strings and numbers, so `torch.load(...,
weights_only=True)` reads it; it carries the train+augment params and the preprocessing meta, so
it explains itself.

Per-epoch metrics are logged with DVCLive (`dvclive/plots/metrics/**.tsv`, one file per metric,
step = epoch) and its summary `dvclive/metrics.json` holds the kept epoch's values: `dvc plots`
draws the curves and `dvc metrics` / `dvc exp show` list the summary. These and the checkpoint are
the stage's DVC outputs, all cached and byte-reproducible (DVC's run cache restores them). What
measures the run itself (throughput, seconds) and describes it (device, processor, parameter
counts) goes to `reports/train.json`, which DVC does not track: a run-cache restore leaves it as
it was, and its `checkpoint_sha256` says which checkpoint it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from components.common import StageError, atomic_path, processor, sha256_bytes, stage_main, write_json
from components.data.augment import build_transform
from components.data.preprocess import load_meta, load_split
from components.model import distributed, evaluate, warm_start
from components.model.distributed import World
from components.model.models import arch_of, architecture, build_model, describe_start, freeze
from components.params import Params, TrainParams, load_params

log = logging.getLogger("medtune.train")
# DVCLive metric name (a file dvclive/plots/metrics/<name>.tsv) of each per-epoch history value.
LIVE_METRICS = {"train_loss": "train/loss", "val_loss": "val/loss", "val_auroc": "val/auroc",
                "val_accuracy": "val/accuracy", "lr": "lr"}


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


def make_loader(images: Any, labels: Sequence[int], batch_size: int, train: bool, transform: Any = None,
                seed: int = 0, num_workers: int = 0, pin_memory: bool = False, world: World = World()) -> DataLoader:
    """DataLoader over uint8 images; shuffled by a seeded generator (which also seeds workers) when `train`.

    In a world of several processes, the training images are shared out by a seeded DistributedSampler
    (call `loader.sampler.set_epoch` every epoch) and `batch_size` is the per-process batch."""
    dataset = ScanDataset(images, labels, transform if train else None)
    sampler = DistributedSampler(dataset, world.size, world.rank, shuffle=True, seed=seed) \
        if train and world.size > 1 else None
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler, num_workers=num_workers,
        pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed) if train and sampler is None else None,
        persistent_workers=num_workers > 0,
        # A last training batch of one image breaks BatchNorm (one value per channel on 1x1 maps).
        drop_last=train and len(sampler or dataset) % batch_size == 1)


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled so a balanced set gets weight 1 for every class."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return torch.tensor(counts.sum() / (num_classes * np.maximum(counts, 1)), dtype=torch.float32)


def make_optimizer(model: nn.Module, tp: TrainParams) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters: the head at `lr`, the backbone at lr * backbone_lr_scale."""
    head = [p for p in model.head.parameters() if p.requires_grad]
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": head, "lr": tp.lr}]
    if body:
        groups.append({"params": body, "lr": tp.lr * tp.backbone_lr_scale})
    if tp.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=tp.lr, weight_decay=tp.weight_decay)
    if tp.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tp.lr, momentum=tp.momentum, weight_decay=tp.weight_decay)
    raise ValueError(f"params: train.optimizer = {tp.optimizer!r} is invalid; expected 'adamw' or 'sgd'.")


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
    if tp.scheduler == "none":
        return 1.0
    raise ValueError(f"params: train.scheduler = {tp.scheduler!r} is invalid; expected 'cosine', 'step' or 'none'.")


def make_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int, tp: TrainParams) -> Any:
    """Stepped after every optimizer step; see `lr_factor` (groups as `make_optimizer`: head, then backbone)."""
    factors = [lambda step, g=g: lr_factor(step, steps_per_epoch, tp, backbone=g > 0)
               for g in range(len(optimizer.param_groups))]
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


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    # channels_last: oneDNN (CPU) and cuDNN run these convolutions faster in NHWC (1.7-1.8x on
    # CPU here, `python -m bench layout`).
    return x.to(device, non_blocking=True, memory_format=torch.channels_last)


class Mixup:
    """mixup as in the paper's reference code (facebookresearch/mixup-cifar10): blend the batch with
    a permutation of itself and blend the two losses, so class weights and label smoothing still
    apply to integer targets. Its own seeded generators leave the global RNG (and so the runs with
    mixup off) untouched."""

    def __init__(self, alpha: float, seed: int):
        self.alpha = alpha
        self.rng = np.random.default_rng(seed)
        self.perm = torch.Generator().manual_seed(seed)

    def loss(self, model: nn.Module, criterion: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lam = float(self.rng.beta(self.alpha, self.alpha))
        perm = torch.randperm(len(y), generator=self.perm).to(y.device)
        out = model(lam * x + (1 - lam) * x[perm])
        return lam * criterion(out, y) + (1 - lam) * criterion(out, y[perm])


def train_one_epoch(model: nn.Module, loader: DataLoader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    device: torch.device, scaler: torch.amp.GradScaler | None = None, amp: bool = False,
                    desc: str = "train", scheduler: Any = None,
                    ema: torch.optim.swa_utils.AveragedModel | None = None,
                    mixup: Mixup | None = None, progress: bool = True) -> dict[str, float]:
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


def auroc(y_true: np.ndarray, probs: np.ndarray, positive_index: int) -> float:
    """Binary: AUROC of the positive class; multi-class: macro one-vs-rest. NaN if a class is absent."""
    k = probs.shape[1]
    if len(np.unique(y_true)) < k:
        return math.nan
    return evaluate.auroc(y_true, probs, positive_index)


@torch.inference_mode()
def evaluate_epoch(model: nn.Module, loader: DataLoader, criterion: nn.Module, device: torch.device,
                   positive_index: int, amp: bool = False) -> dict[str, float]:
    """Validation loss (same weighted criterion as training), AUROC and accuracy."""
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
    return {"val_loss": total / len(y_true), "val_auroc": auroc(y_true, p, positive_index),
            "val_accuracy": float((p.argmax(1) == y_true).mean())}


def _improved(value: float, best: float | None, metric: str) -> bool:
    if best is None:
        return True  # the first epoch is always kept, so a checkpoint exists
    if math.isnan(value):
        return False
    if math.isnan(best):
        return True
    return value < best if metric == "val_loss" else value > best


def _split(prepared_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 memmap, label indices) of one split; load_split checks the cache is consistent."""
    images, index = load_split(prepared_dir, name)
    return images, index["label_index"].to_numpy().astype(np.int64)


def _nan_to_none(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x


def open_live(live_dir: Path) -> Any:
    """A DVCLive logger that writes only `live_dir`/metrics.json and `live_dir`/plots/metrics/ (no
    dvc.yaml of its own: dvc.yaml declares them; no report; no experiment of its own)."""
    from dvclive import Live

    class StageLive(Live):
        def _init_dvc(self) -> None:
            # DVCLive looks for the DVC project (and `dvc init`s a git repository that has none).
            # Only under `dvc repro` / `dvc exp run` (which set DVC_ROOT) is there one to find; a flow
            # calling the stage in-process, a test or a plain `medtune train` just write the files.
            # Its DVC integration (live updates to DVC Studio) is a bonus: where it fails (a git
            # repository without commits raises) the files are written all the same.
            if not os.environ.get("DVC_ROOT"):
                return
            try:
                super()._init_dvc()
            except Exception as exc:  # noqa: BLE001 - scmrepo and dvc raise several types
                log.debug("DVCLive without its DVC integration: %s", exc)
                self._dvc_repo, self._inside_dvc_exp = None, False

    return StageLive(str(live_dir), save_dvc_exp=False, dvcyaml=False, report=None)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def log_epoch(live: Any, row: dict[str, Any], prefix: str = "") -> None:
    """One epoch of one model to DVCLive, at step = epoch (`prefix` "member<i>/" in an ensemble)."""
    live.step = row["epoch"]
    for key, name in LIVE_METRICS.items():
        live.log_metric(prefix + name, row[key])
    live.next_step()


def live_summary(fits: list[dict[str, Any]], ensemble_val: dict[str, float] | None) -> dict[str, Any]:
    """dvclive/metrics.json: the validation metrics of the model that is kept (a single model's best
    epoch, or the ensemble's averaged logits), its best epoch, and `step` (the last epoch run)."""
    if ensemble_val is None:
        f = fits[0]
        best = next(r for r in f["history"] if r["epoch"] == f["best_epoch"])
        out: dict[str, Any] = {"best_epoch": f["best_epoch"], "train": {"loss": best["train_loss"]},
                               "val": {k.removeprefix("val_"): best[k] for k in ("val_loss", "val_auroc", "val_accuracy")}}
    else:
        out = {"val": {k.removeprefix("val_"): v for k, v in ensemble_val.items()}}
    for group in ("train", "val"):  # an undefined value (nan AUROC of a one-class split) is left out
        if group in out:
            out[group] = {k: v for k, v in out[group].items() if _finite(v)}
    return {"step": max(f["epochs_run"] for f in fits), **out}


def train(prepared_dir: Path, out_model: Path, out_record: Path, live_dir: Path, params: Params,
          registry: Path = Path("registry")) -> dict:
    """Fine-tune on the train split, select on the val split; write the checkpoint, the DVCLive
    folder and the run record (`out_record`, reports/train.json); return the run record.

    With `train.init_from` the run starts from that registry model's weights (components/model/warm_start.py,
    looked up in `registry`) instead of ImageNet's."""
    started = time.perf_counter()
    prepared_dir, tp = Path(prepared_dir), params.train
    meta = load_meta(prepared_dir)
    classes = list(meta.get("classes", []))
    if classes != list(params.data.classes):
        raise StageError(f"{prepared_dir}/meta.json has classes {classes}, but params data.classes is "
                         f"{list(params.data.classes)}; rerun preprocess (dvc repro).")
    x_train, y_train = _split(prepared_dir, "train")
    x_val, y_val = _split(prepared_dir, "val")
    if len(y_train) < 2 or len(y_val) < 1:
        raise StageError(f"{prepared_dir}: {len(y_train)} training and {len(y_val)} validation images; expected "
                         "at least 2 and 1 (check split.val_fraction and the data).")
    missing = [classes[c] for c in range(len(classes)) if c not in set(y_train.tolist())]
    if missing:
        raise StageError(f"{prepared_dir}/index.csv: the train split has no images of class(es) {missing}; "
                         "expected every class of data.classes in it.")
    if len(set(y_val.tolist())) < 2 and tp.early_stopping_metric == "val_auroc":
        log.warning("the validation split holds one class only: val_auroc is undefined (nan), selection keeps epoch 1")
    inits: list[tuple[dict[str, Any], dict[str, str]] | None] = [None] * tp.ensemble
    if tp.init_from:
        states, info = warm_start.load_init(
            registry, tp.init_from, classes=classes, in_channels=int(x_train.shape[1]),
            image_size=int(meta.get("image_size", x_train.shape[-1])), arch=arch_of(tp.backbone), members=tp.ensemble)
        inits = [(state, info) for state in states]
        log.info("%s", info["description"])

    world = distributed.world()
    if world.size != tp.processes:
        raise StageError(f"torchrun started {world.size} process(es), but params train.processes is {tp.processes}; "
                         "expected them equal, so that the recorded parameters say how the model was trained.")
    device = distributed.device(world)
    if not world.main:
        log.setLevel(logging.WARNING)  # rank 0 reports progress; the others only warnings and errors
    use_amp = tp.amp and device.type == "cuda"
    # Determinism: seed everything, ask for deterministic kernels (warn where none exists).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    det_before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    live = open_live(Path(live_dir)) if world.main else None  # rank 0 logs and writes

    def logger(member: int) -> Callable[[dict[str, Any]], None] | None:
        prefix = f"member{member + 1}/" if tp.ensemble > 1 else ""
        return None if live is None else lambda row: log_epoch(live, row, prefix)

    try:
        with distributed.process_group(world, device):
            # An ensemble is `train.ensemble` independent runs with seeds seed, seed + 1, ...
            fits = [fit(x_train, y_train, x_val, y_val, len(classes), params, tp.seed + m, device, use_amp,
                        f"member {m + 1}/{tp.ensemble}, " if tp.ensemble > 1 else "", world, logger(m), inits[m])
                    for m in range(tp.ensemble)]
    finally:
        torch.use_deterministic_algorithms(det_before[0], warn_only=det_before[1])
    if not world.main:
        return {}  # rank 0 writes the artefacts

    first = fits[0]
    per_member = ("best_epoch", "epochs_run", "best_value")
    summary = {
        "backbone": tp.backbone, "pretrained": first["pretrained"], "device": str(device), "amp": use_amp,
        "processes": world.size, "processor": processor(),
        "ensemble": tp.ensemble, "selection_metric": tp.early_stopping_metric,
        # One number for a single model; a list, one per member, for an ensemble.
        **{k: first[k] if tp.ensemble == 1 else [f[k] for f in fits] for k in per_member},
        "n_train": int(len(y_train)), "n_val": int(len(y_val)),
        "trainable_params": first["trainable"], "total_params": first["total"] * tp.ensemble,
        # Measurements of this run: not in the DVC outputs, which must be the same bytes every run.
        "throughput_img_s": first["throughput"],
    }
    history = [{**row, "member": m} for m, f in enumerate(fits) for row in f["history"]]
    if tp.ensemble == 1:
        state = first["state"]
    else:
        # The ensemble as load_checkpoint rebuilds it; its own validation metrics (averaged logits).
        state = {f"members.{m}.{k}": v for m, f in enumerate(fits) for k, v in f["state"].items()}
        model = architecture(first["arch"], len(classes), int(x_train.shape[1]), tp.ensemble)
        model.load_state_dict(state)
        val_loader = make_loader(x_val, y_val, tp.batch_size, False)
        criterion = _criterion(y_train, len(classes), tp, device)
        summary["ensemble_val"] = evaluate_epoch(model.to(device, memory_format=torch.channels_last), val_loader,
                                                 criterion, device, params.positive_index, use_amp)
        log.info("ensemble of %d on the validation split: %s", tp.ensemble, summary["ensemble_val"])
    checkpoint = {
        "state_dict": state, "members": tp.ensemble, "backbone": first["arch"], "classes": classes,
        "in_channels": int(x_train.shape[1]), "image_size": int(meta.get("image_size", x_train.shape[-1])),
        "params": {"train": dataclasses.asdict(tp), "augment": dataclasses.asdict(params.augment)},
        "meta": meta, "pretrained": first["pretrained"], "history": history,
        **{k: summary[k] for k in ("best_epoch", "epochs_run")},
        "best_metric": {"name": tp.early_stopping_metric, "value": summary["best_value"]}, "device": str(device),
        "processor": summary["processor"],
    }
    # Serialise in memory: torch.save names the zip's inner folder after the file, so saving to the
    # random temporary name would make the bytes (and DVC's hash) differ run to run.
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    with atomic_path(out_model) as tmp:
        tmp.write_bytes(buf.getvalue())
    live.summary = live_summary(fits, summary.get("ensemble_val"))
    live.end()
    summary.update(checkpoint_sha256=sha256_bytes(buf.getvalue()), seconds=round(time.perf_counter() - started, 1))
    write_json(out_record, summary)
    log.info("best %s=%s at epoch %s of %s; wrote %s", tp.early_stopping_metric, summary["best_value"],
             summary["best_epoch"], summary["epochs_run"], out_model)
    return summary


def _criterion(y_train: np.ndarray, num_classes: int, tp: TrainParams, device: torch.device) -> nn.Module:
    weight = class_weights(y_train, num_classes).to(device) if tp.class_weighting else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=tp.label_smoothing)


def fit(x_train: Any, y_train: np.ndarray, x_val: Any, y_val: np.ndarray, num_classes: int, params: Params,
        seed: int, device: torch.device, use_amp: bool, desc: str = "", world: World = World(),
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        init: tuple[dict[str, Any], dict[str, str]] | None = None) -> dict[str, Any]:
    """Train one model with `seed`; returns its kept weights (CPU, NCHW; rank 0's), history and counts.
    `on_epoch` gets each epoch's history row as soon as it is known (DVCLive's per-epoch log).
    `init`: (state_dict, pretrained record) of a warm start, loaded instead of the ImageNet weights."""
    tp = params.train
    torch.manual_seed(seed)
    # A warm start needs no ImageNet weights: the champion's replace every tensor (strictly checked).
    model, info = build_model(tp.backbone, num_classes, int(x_train.shape[1]), tp.pretrained and init is None,
                              tp.dropout)
    pretrained = describe_start(info)
    if init is not None:
        try:
            model.load_state_dict(init[0])
        except RuntimeError as exc:
            raise StageError(f"{init[1]['source']}: its weights do not fit {model.arch} "
                             f"({str(exc).splitlines()[0]}); set train.init_from: null for a cold start.") from None
        pretrained = init[1]
    trainable = freeze(model, tp.freeze, tp.unfreeze_last_n)
    model.to(device, memory_format=torch.channels_last)
    net: nn.Module = model  # what takes the training steps
    if world.size > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        torch.manual_seed(seed + (world.rank << 32))  # each process its own augmentation draws
    ema = make_ema(model, tp.ema_decay) if tp.ema_decay > 0 else None
    selected = ema.module if ema is not None else model  # what is validated and saved
    criterion = _criterion(y_train, num_classes, tp, device)
    optimizer = make_optimizer(model, tp)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    pin = device.type == "cuda"
    train_loader = make_loader(x_train, y_train, tp.batch_size // world.size, True, build_transform(params.augment),
                               seed, tp.num_workers, pin, world)
    val_loader = make_loader(x_val, y_val, tp.batch_size, False, None, seed, tp.num_workers, pin)
    scheduler = make_scheduler(optimizer, len(train_loader), tp)
    mixup = Mixup(tp.mixup_alpha, seed) if tp.mixup_alpha > 0 else None
    log.info("training %s%s (%s) on %s, seed %d: %d train / %d val images, %d trainable parameters", desc,
             tp.backbone, pretrained["description"], device, seed, len(y_train), len(y_val), trainable)

    metric, history = tp.early_stopping_metric, []
    best_value, best_epoch, best_state, stale = None, 0, None, 0
    images_seen, seconds = 0, 0.0
    epochs = tqdm(range(1, tp.epochs + 1), desc=f"{desc}epochs", unit="epoch", disable=not world.main)
    for epoch in epochs:
        lr = optimizer.param_groups[0]["lr"]
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        tr = train_one_epoch(net, train_loader, criterion, optimizer, device, scaler, use_amp, f"epoch {epoch}",
                             scheduler, ema, mixup, progress=world.main)
        if world.size > 1:  # the loss over every process's images; rank 0 validates, all follow its decision
            loss_sum, images = distributed.total([tr["loss"] * tr["images"], tr["images"]], world, device)
            tr = {**tr, "loss": loss_sum / images, "images": int(images)}
        ev = distributed.from_main(
            evaluate_epoch(selected, val_loader, criterion, device, params.positive_index, use_amp)
            if world.main else None, world)
        images_seen, seconds = images_seen + tr["images"], seconds + tr["seconds"]
        history.append({"epoch": epoch, "train_loss": tr["loss"], **ev, "lr": lr})
        if on_epoch is not None:
            on_epoch(history[-1])
        epochs.set_postfix(train_loss=f"{tr['loss']:.4f}", **{metric: f"{ev[metric]:.4f}"})
        log.info("%sepoch %d: train_loss=%.4f val_loss=%.4f val_auroc=%.4f val_accuracy=%.4f lr=%.3g", desc,
                 epoch, tr["loss"], ev["val_loss"], ev["val_auroc"], ev["val_accuracy"], lr)
        if _improved(ev[metric], best_value, metric):
            best_value, best_epoch, stale = ev[metric], epoch, 0
            # In-memory copy on the CPU: later epochs must not overwrite the kept weights.
            # contiguous(): the checkpoint stays in the usual NCHW layout whatever trained it.
            best_state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in selected.state_dict().items()}
        else:
            stale += 1
            if stale >= tp.patience:
                log.info("early stopping after epoch %d: no %s improvement for %d epoch(s)", epoch, metric, stale)
                break
    epochs.close()
    distributed.check_replicas(model, world, device)
    return {"state": best_state, "history": history, "best_epoch": best_epoch, "best_value": _nan_to_none(best_value),
            "epochs_run": len(history), "arch": model.arch, "pretrained": pretrained, "trainable": int(trainable),
            "total": int(sum(p.numel() for p in model.parameters())),
            "throughput": round(images_seen / seconds, 1) if seconds > 0 else None}


def main(argv: Sequence[str] | None = None) -> int:
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--prepared", default="data/prepared", help="preprocess output folder (default: data/prepared)")
        p.add_argument("--model", default="models/model.pt", help="checkpoint to write (default: models/model.pt)")
        p.add_argument("--record", default="reports/train.json",
                       help="run record to write: throughput, seconds, device (default: reports/train.json)")
        p.add_argument("--live", default="dvclive",
                       help="DVCLive folder: per-epoch metrics and their summary (default: dvclive)")
        p.add_argument("--registry", default="registry",
                       help="model registry where train.init_from's weights are looked up (default: registry)")

    def run(args: argparse.Namespace) -> None:
        params = load_params(args.params)
        if params.train.processes > 1 and distributed.world().size == 1:
            # Start again as torchrun's workers, with the same arguments; they write the artefacts.
            distributed.launch(params.train.processes, "components.model.train", [
                "--params", args.params, "--prepared", args.prepared, "--model", args.model,
                "--record", args.record, "--live", args.live, "--registry", args.registry,
                *(["-v"] if args.verbose else [])])
            return
        summary = train(Path(args.prepared), Path(args.model), Path(args.record), Path(args.live), params,
                        Path(args.registry))
        if summary:  # rank 0 of several, or the only process
            print(f"wrote {args.model}: best {summary['selection_metric']}={summary['best_value']} "
                  f"at epoch {summary['best_epoch']}/{summary['epochs_run']}")

    return stage_main("Stage 5: fine-tune a pretrained backbone with a new head.", add_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
