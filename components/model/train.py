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
import io
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.common import StageError, atomic_path, processor, sha256_bytes, stage_main, write_json
from components.data.preprocess import load_meta, load_split
from components.model import distributed, warm_start
from components.model.epoch import evaluate_epoch, make_criterion
from components.model.fit import Run, fit, make_loader
from components.model.models import arch_of, architecture
from components.params import Params, load_params

log = logging.getLogger("medtune.train")
# DVCLive metric name (a file dvclive/plots/metrics/<name>.tsv) of each per-epoch history value.
LIVE_METRICS = {
    "train_loss": "train/loss",
    "val_loss": "val/loss",
    "val_auroc": "val/auroc",
    "val_accuracy": "val/accuracy",
    "lr": "lr",
}


def _split(prepared_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 memmap, label indices) of one split; load_split checks the cache is consistent."""
    images, index = load_split(prepared_dir, name)
    return images, index["label_index"].to_numpy().astype(np.int64)


def load_data(
    prepared_dir: Path, params: Params
) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(meta, x_train, y_train, x_val, y_val) of the prepared folder, after checking they can train
    a model of `data.classes`: StageError naming the file and the fix if not."""
    meta = load_meta(prepared_dir)
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
        out: dict[str, Any] = {
            "best_epoch": f["best_epoch"],
            "train": {"loss": best["train_loss"]},
            "val": {k.removeprefix("val_"): best[k] for k in ("val_loss", "val_auroc", "val_accuracy")},
        }
    else:
        out = {"val": {k.removeprefix("val_"): v for k, v in ensemble_val.items()}}
    for group in ("train", "val"):  # an undefined value (nan AUROC of a one-class split) is left out
        if group in out:
            out[group] = {k: v for k, v in out[group].items() if _finite(v)}
    return {"step": max(f["epochs_run"] for f in fits), **out}


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

    world = distributed.world()
    if world.size != tp.processes:
        raise StageError(
            f"torchrun started {world.size} process(es), but params train.processes is {tp.processes}; "
            "expected them equal, so that the recorded parameters say how the model was trained."
        )
    device = distributed.device(world)
    if not world.main:
        log.setLevel(logging.WARNING)  # rank 0 reports progress; the others only warnings and errors
    use_amp = tp.amp and device.type == "cuda"
    run = Run(x_train, y_train, x_val, y_val, params, device, use_amp, world)
    live = open_live(Path(live_dir)) if world.main else None  # rank 0 logs and writes

    def logger(member: int) -> Callable[[dict[str, Any]], None] | None:
        prefix = f"member{member + 1}/" if tp.ensemble > 1 else ""
        return None if live is None else lambda row: log_epoch(live, row, prefix)

    with deterministic(), distributed.process_group(world, device):
        # An ensemble is `train.ensemble` independent runs with seeds seed, seed + 1, ...
        fits = [
            fit(run, tp.seed + m, f"member {m + 1}/{tp.ensemble}, " if tp.ensemble > 1 else "", logger(m), inits[m])
            for m in range(tp.ensemble)
        ]
    if not world.main:
        return {}  # rank 0 writes the artefacts

    summary = run_summary(fits, params, device, use_amp, world.size, len(y_train), len(y_val))
    state = fits[0]["state"]
    if tp.ensemble > 1:
        state, summary["ensemble_val"] = ensemble(fits, x_train, y_train, x_val, y_val, params, device, use_amp)
        log.info("ensemble of %d on the validation split: %s", tp.ensemble, summary["ensemble_val"])
    blob = save_checkpoint(checkpoint(fits, state, summary, meta, x_train.shape, params), out_model)
    live.summary = live_summary(fits, summary.get("ensemble_val"))
    live.end()
    summary.update(checkpoint_sha256=sha256_bytes(blob), seconds=round(time.perf_counter() - started, 1))
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


def run_summary(
    fits: list[dict[str, Any]],
    params: Params,
    device: torch.device,
    use_amp: bool,
    processes: int,
    n_train: int,
    n_val: int,
) -> dict[str, Any]:
    """reports/train.json without the checkpoint hash and the seconds (added once the checkpoint is written)."""
    tp, first = params.train, fits[0]
    per_member = ("best_epoch", "epochs_run", "best_value")
    return {
        "backbone": tp.backbone,
        "pretrained": first["pretrained"],
        "device": str(device),
        "amp": use_amp,
        "processes": processes,
        "processor": processor(),
        "ensemble": tp.ensemble,
        "selection_metric": tp.early_stopping_metric,
        # One number for a single model; a list, one per member, for an ensemble.
        **{k: first[k] if tp.ensemble == 1 else [f[k] for f in fits] for k in per_member},
        "n_train": int(n_train),
        "n_val": int(n_val),
        "trainable_params": first["trainable"],
        "total_params": first["total"] * tp.ensemble,
        # Measurements of this run: not in the DVC outputs, which must be the same bytes every run.
        "throughput_img_s": first["throughput"],
    }


def ensemble(
    fits: list[dict[str, Any]],
    x_train: Any,
    y_train: np.ndarray,
    x_val: Any,
    y_val: np.ndarray,
    params: Params,
    device: torch.device,
    use_amp: bool,
) -> tuple[dict[str, Any], dict[str, float]]:
    """(state_dict of the members as one model, as load_checkpoint rebuilds it; its own validation
    metrics, from the averaged logits)."""
    tp, num_classes = params.train, len(params.data.classes)
    state = {f"members.{m}.{k}": v for m, f in enumerate(fits) for k, v in f["state"].items()}
    model = architecture(fits[0]["arch"], num_classes, int(x_train.shape[1]), tp.ensemble)
    model.load_state_dict(state)
    val_loader = make_loader(x_val, y_val, tp.batch_size, False)
    criterion = make_criterion(y_train, num_classes, tp, device)
    return state, evaluate_epoch(
        model.to(device, memory_format=torch.channels_last),
        val_loader,
        criterion,
        device,
        params.positive_index,
        use_amp,
    )


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
        in_channels=int(shape[1]),
        image_size=int(meta.get("image_size", shape[-1])),
        arch=arch_of(tp.backbone),
        members=tp.ensemble,
    )
    log.info("%s", info["description"])
    return [(state, info) for state in states]


def checkpoint(
    fits: list[dict[str, Any]],
    state: dict[str, Any],
    summary: dict[str, Any],
    meta: dict[str, Any],
    shape: tuple[int, ...],
    params: Params,
) -> dict[str, Any]:
    """models/model.pt's contents: the weights and everything that explains them (params, preprocessing
    meta, starting weights, per-epoch history, selection). `shape`: the training images' (N, C, H, W)."""
    tp = params.train
    # classes: equal to data.classes (load_data checks), as meta's own strings: pickle writes a string
    # the checkpoint holds twice (here and in meta) once, so which objects they are shows in its bytes.
    return {
        "state_dict": state,
        "members": tp.ensemble,
        "backbone": fits[0]["arch"],
        "classes": list(meta["classes"]),
        "in_channels": int(shape[1]),
        "image_size": int(meta.get("image_size", shape[-1])),
        "params": {"train": tp.to_dict(), "augment": params.augment.to_dict()},
        "meta": meta,
        "pretrained": fits[0]["pretrained"],
        "history": [{**row, "member": m} for m, f in enumerate(fits) for row in f["history"]],
        **{k: summary[k] for k in ("best_epoch", "epochs_run")},
        "best_metric": {"name": tp.early_stopping_metric, "value": summary["best_value"]},
        "device": summary["device"],
        "processor": summary["processor"],
    }


def save_checkpoint(checkpoint: dict[str, Any], out_model: Path) -> bytes:
    """Write the checkpoint atomically; return its bytes."""
    # Serialise in memory: torch.save names the zip's inner folder after the file, so saving to the
    # random temporary name would make the bytes (and DVC's hash) differ run to run.
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    with atomic_path(out_model) as tmp:
        tmp.write_bytes(buf.getvalue())
    return buf.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    def add_args(p: argparse.ArgumentParser) -> None:
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

    def run(args: argparse.Namespace) -> None:
        params = load_params(args.params)
        if params.train.processes > 1 and distributed.world().size == 1:
            # Start again as torchrun's workers, with the same arguments; they write the artefacts.
            distributed.launch(
                params.train.processes,
                "components.model.train",
                [
                    "--params",
                    args.params,
                    "--prepared",
                    args.prepared,
                    "--model",
                    args.model,
                    "--record",
                    args.record,
                    "--live",
                    args.live,
                    "--registry",
                    args.registry,
                    *(["-v"] if args.verbose else []),
                ],
            )
            return
        summary = train(
            Path(args.prepared), Path(args.model), Path(args.record), Path(args.live), params, Path(args.registry)
        )
        if summary:  # rank 0 of several, or the only process
            print(
                f"wrote {args.model}: best {summary['selection_metric']}={summary['best_value']} "
                f"at epoch {summary['best_epoch']}/{summary['epochs_run']}"
            )

    return stage_main("Stage 5: fine-tune a pretrained backbone with a new head.", add_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
