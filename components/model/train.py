"""Stage 5: fine-tune a pretrained backbone with a new head on the prepared images.

    medtune train      # data/prepared -> models/model.pt, dvclive/ (per-epoch metrics), reports/train.json

Each model is trained by `fit` (components/model/fit.py: the epochs, validation, the kept epoch;
components/model/optim.py: optimizer, schedule, weight averaging, mixup); this module checks the
data, trains one model or an ensemble, and writes the results. Seeded and deterministic on
CPU: the same data and params give the same weights on the same kind of processor (another
processor's floating-point kernels round differently, and training amplifies it: docs/quality.md;
train.json and the checkpoint record the processor). On a GPU it uses CUDA and, with
`train.amp`, float16 autocast with a GradScaler. With `train.processes` > 1 it trains data-parallel
(DDP) under torchrun: each process a share of every batch, rank 0 validates and writes
(components/model/distributed.py).

Regression (`data.task: regression`): one output, trained on the `target` column of
data/prepared/index.csv standardised with the train split's mean and standard deviation (both
recorded in the checkpoint), with `train.loss` (MSE or Huber); each epoch is validated by its loss and
MAE in the target's unit (docs/regression.md).

With `train.init_from` (the sha256 of a registry model.pt; the retrain flow sets the champion's) the
network starts from those weights instead of ImageNet's: a warm start (components/model/warm_start.py).

The checkpoint is a plain dict of tensors, strings and numbers, so `torch.load(...,
weights_only=True)` reads it; it carries the train+augment params and the preprocessing meta, so
it explains itself.

Per-epoch metrics are logged with DVCLive (components/model/live.py: `dvclive/plots/metrics/**.tsv`,
one file per metric, step = epoch) and its summary `dvclive/metrics.json` holds the kept epoch's
values: `dvc plots` draws the curves and `dvc metrics` / `dvc exp show` list the summary. These and
the checkpoint are the stage's DVC outputs, all cached and byte-reproducible (DVC's run cache
restores them). What measures the run itself (throughput, seconds) and describes it (device,
processor, parameter counts) goes to `reports/train.json`, which DVC does not track: a run-cache
restore leaves it as it was, and its `checkpoint_sha256` says which checkpoint it measured. The
checkpoint's contents and the run record are made in components/model/train_record.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.common import StageError, sha256_bytes, stage_main, write_json
from components.data.preprocess import load_meta, load_split
from components.model import distributed, warm_start
from components.model.distributed import World
from components.model.epoch import make_criterion
from components.model.fit import Run, fit, make_loader
from components.model.live import live_summary, log_epoch, open_live
from components.model.models import arch_of, architecture
from components.model.targets import target_stats, targets
from components.model.train_record import checkpoint, run_summary, save_checkpoint
from components.params import Params, load_params

log = logging.getLogger("medtune.train")


def _split(prepared_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 memmap, label indices) of one split; load_split checks the cache is consistent."""
    images, index = load_split(prepared_dir, name)
    return images, index["label_index"].to_numpy().astype(np.int64)


def _check_task(prepared_dir: Path, meta: dict[str, Any], params: Params) -> None:
    task = meta.get("task", "classification")
    if task != params.data.task:
        raise StageError(
            f"{prepared_dir}/meta.json has task {task!r}, but params data.task is {params.data.task!r}; "
            "rerun preprocess (dvc repro)."
        )


def load_regression_data(
    prepared_dir: Path, params: Params
) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(meta, x_train, y_train, x_val, y_val) of a regression's prepared folder, the y the targets in
    their own unit; StageError naming the file and the fix if they cannot train a model."""
    meta = load_meta(prepared_dir)
    _check_task(prepared_dir, meta, params)
    (x_train, index_train), (x_val, index_val) = (load_split(prepared_dir, s) for s in ("train", "val"))
    y_train, y_val = targets(prepared_dir, index_train, "train"), targets(prepared_dir, index_val, "val")
    if len(y_train) < 2 or len(y_val) < 1:
        raise StageError(
            f"{prepared_dir}: {len(y_train)} training and {len(y_val)} validation images; expected "
            "at least 2 and 1 (check split.val_fraction and the data)."
        )
    return meta, x_train, y_train, x_val, y_val


def load_data(
    prepared_dir: Path, params: Params
) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(meta, x_train, y_train, x_val, y_val) of the prepared folder, after checking they can train
    a model of `data.classes`: StageError naming the file and the fix if not. Regression
    (data.task): `load_regression_data`."""
    if params.data.regression:
        return load_regression_data(prepared_dir, params)
    meta = load_meta(prepared_dir)
    _check_task(prepared_dir, meta, params)
    classes = list(meta.get("classes", []))
    if classes != list(params.data.classes):
        raise StageError(
            f"{prepared_dir}/meta.json has classes {classes}, but params data.classes is "
            f"{list(params.data.classes)}; rerun preprocess (dvc repro)."
        )
    x_train, y_train = _split(prepared_dir, "train")
    x_val, y_val = _split(prepared_dir, "val")
    if len(y_train) < 2 or len(y_val) < 1:
        raise StageError(
            f"{prepared_dir}: {len(y_train)} training and {len(y_val)} validation images; expected "
            "at least 2 and 1 (check split.val_fraction and the data)."
        )
    missing = [classes[c] for c in range(len(classes)) if c not in set(y_train.tolist())]
    if missing:
        raise StageError(
            f"{prepared_dir}/index.csv: the train split has no images of class(es) {missing}; "
            "expected every class of data.classes in it."
        )
    if len(set(y_val.tolist())) < 2 and params.train.early_stopping_metric == "val_auroc":
        log.warning("the validation split holds one class only: val_auroc is undefined (nan), selection keeps epoch 1")
    return meta, x_train, y_train, x_val, y_val


@contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic kernels (a warning where none exists) inside; the caller's setting restored after."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def train(
    prepared_dir: Path,
    out_model: Path,
    out_record: Path,
    live_dir: Path,
    params: Params,
    registry: Path = Path("registry"),
) -> dict:
    """Fine-tune on the train split, select on the val split; write the checkpoint, the DVCLive
    folder and the run record (`out_record`, reports/train.json); return the run record.

    With `train.init_from` the run starts from that registry model's weights (components/model/warm_start.py,
    looked up in `registry`) instead of ImageNet's."""
    started = time.perf_counter()
    prepared_dir, tp = Path(prepared_dir), params.train
    meta, x_train, y_train, x_val, y_val = load_data(prepared_dir, params)
    inits = warm_inits(registry, params, meta, x_train.shape)
    world = _world(params)
    device = distributed.device(world)
    if not world.main:
        log.setLevel(logging.WARNING)  # rank 0 reports progress; the others only warnings and errors
    amp = tp.amp and device.type == "cuda"
    if params.data.regression:  # trained on standardised targets; the checkpoint records how to undo it
        mean, std = target_stats(y_train)
        log.info("regression targets: train mean %.6g, standard deviation %.6g", mean, std)
        standard = [((y - mean) / std).astype(np.float32) for y in (y_train, y_val)]
        run = Run(x_train, standard[0], x_val, standard[1], params, device, amp, world, mean, std)
    else:
        run = Run(x_train, y_train, x_val, y_val, params, device, amp, world)
    live = open_live(Path(live_dir)) if world.main else None  # rank 0 logs and writes
    with deterministic(), distributed.process_group(world, device):
        fits = _fit_members(run, inits, live)
    if not world.main:
        return {}  # rank 0 writes the artefacts
    summary = _write_model(fits, run, meta, out_model, live)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    write_json(out_record, summary)
    log.info(
        "best %s=%s at epoch %s of %s; wrote %s",
        tp.early_stopping_metric,
        summary["best_value"],
        summary["best_epoch"],
        summary["epochs_run"],
        out_model,
    )
    return summary


def _world(params: Params) -> World:
    """This process's place among torchrun's; StageError unless there are `train.processes` of them."""
    world, processes = distributed.world(), params.train.processes
    if world.size != processes:
        raise StageError(
            f"torchrun started {world.size} process(es), but params train.processes is {processes}; "
            "expected them equal, so that the recorded parameters say how the model was trained."
        )
    return world


def _fit_members(run: Run, inits: list[Any], live: Any) -> list[dict[str, Any]]:
    """`fit` of the one model, or of each ensemble member, each epoch logged to DVCLive (rank 0's `live`)."""
    tp = run.params.train

    def logger(member: int) -> Callable[[dict[str, Any]], None] | None:
        prefix = f"member{member + 1}/" if tp.ensemble > 1 else ""
        return None if live is None else lambda row: log_epoch(live, row, prefix)

    # An ensemble is `train.ensemble` independent runs with seeds seed, seed + 1, ...
    return [
        fit(run, tp.seed + m, f"member {m + 1}/{tp.ensemble}, " if tp.ensemble > 1 else "", logger(m), inits[m])
        for m in range(tp.ensemble)
    ]


def _write_model(
    fits: list[dict[str, Any]], run: Run, meta: dict[str, Any], out_model: Path, live: Any
) -> dict[str, Any]:
    """Write the checkpoint (the one model, or the members as one ensemble) and DVCLive's summary; return
    the run record, all but its seconds."""
    tp = run.params.train
    summary = run_summary(fits, run)
    state = fits[0]["state"]
    if tp.ensemble > 1:
        state, summary["ensemble_val"] = ensemble(fits, run)
        log.info("ensemble of %d on the validation split: %s", tp.ensemble, summary["ensemble_val"])
    blob = save_checkpoint(checkpoint(fits, state, summary, meta, run), out_model)
    live.summary = live_summary(fits, summary.get("ensemble_val"))
    live.end()
    summary["checkpoint_sha256"] = sha256_bytes(blob)
    return summary


def ensemble(fits: list[dict[str, Any]], run: Run) -> tuple[dict[str, Any], dict[str, float]]:
    """(state_dict of the members as one model, as load_checkpoint rebuilds it; its own validation
    metrics, from the averaged logits, or a regression's averaged outputs)."""
    tp, num_classes, device = run.params.train, run.num_classes, run.device
    state = {f"members.{m}.{k}": v for m, f in enumerate(fits) for k, v in f["state"].items()}
    model = architecture(fits[0]["arch"], num_classes, int(run.x_train.shape[1]), tp.ensemble)
    model.load_state_dict(state)
    val_loader = make_loader(run.x_val, run.y_val, tp.batch_size, False)
    criterion = make_criterion(run.y_train, num_classes, tp, device, run.regression)
    return state, run.validate(model.to(device, memory_format=torch.channels_last), val_loader, criterion)


def warm_inits(
    registry: Path, params: Params, meta: dict[str, Any], shape: tuple[int, ...]
) -> list[tuple[dict[str, Any], dict[str, str]] | None]:
    """Per ensemble member, the (state_dict, pretrained record) of `train.init_from` (a warm start), or None."""
    tp = params.train
    if not tp.init_from:
        return [None] * tp.ensemble
    states, info = warm_start.load_init(
        registry,
        tp.init_from,
        classes=list(meta["classes"]),
        task=params.data.task,
        in_channels=int(shape[1]),
        image_size=int(meta.get("image_size", shape[-1])),
        arch=arch_of(tp.backbone),
        members=tp.ensemble,
    )
    log.info("%s", info["description"])
    return [(state, info) for state in states]


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prepared", default="data/prepared", help="preprocess output folder (default: data/prepared)")
    p.add_argument("--model", default="models/model.pt", help="checkpoint to write (default: models/model.pt)")
    p.add_argument(
        "--record",
        default="reports/train.json",
        help="run record to write: throughput, seconds, device (default: reports/train.json)",
    )
    p.add_argument(
        "--live", default="dvclive", help="DVCLive folder: per-epoch metrics and their summary (default: dvclive)"
    )
    p.add_argument(
        "--registry",
        default="registry",
        help="model registry where train.init_from's weights are looked up (default: registry)",
    )


def _run(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    if params.train.processes > 1 and distributed.world().size == 1:
        # Start again as torchrun's workers, with the same arguments; they write the artefacts.
        distributed.launch(params.train.processes, "components.model.train", _worker_args(args))
        return
    summary = train(
        Path(args.prepared), Path(args.model), Path(args.record), Path(args.live), params, Path(args.registry)
    )
    if summary:  # rank 0 of several, or the only process
        print(
            f"wrote {args.model}: best {summary['selection_metric']}={summary['best_value']} "
            f"at epoch {summary['best_epoch']}/{summary['epochs_run']}"
        )


def _worker_args(args: argparse.Namespace) -> list[str]:
    """This command's arguments, for each of torchrun's workers."""
    out: list[str] = []
    for name in ("params", "prepared", "model", "record", "live", "registry"):
        out += [f"--{name}", getattr(args, name)]
    return out + (["-v"] if args.verbose else [])


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("Stage 5: fine-tune a pretrained backbone with a new head.", _add_args, _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
