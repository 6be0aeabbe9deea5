"""Benchmarks, printed as ratios measured in one run (not tests: nothing here asserts a time).

    python -m bench            # all, about 30 minutes on 2 CPU cores
    python -m bench data onnx  # a subset: data | onnx | dvc | layout | backbones | ddp | append | linear |
                               #   stability | warm_start | noop | predict | tune

1. data: training images/s through the real data path (uint8 memmap on disk -> Dataset ->
   DataLoader -> on-the-fly augmentation) divided by images/s of the same training steps on the
   same tensors already in RAM (same loader and augmentation). Target >= 0.95. Also printed: the
   real path against batches made beforehand, i.e. what the augmentation itself costs.
2. onnx: ONNX Runtime (CPU) images/s divided by PyTorch eager images/s at batch 32, plus the max
   probability difference between the two. Target >= 1.5, parity within export.tolerance.
3. dvc: wall time of a no-op `dvc repro` on a tiny pipeline that has already run.
4. layout: training images/s in channels-last memory layout (what `medtune train` uses) divided by
   images/s in the default NCHW layout, same model and batches, at 64, 96 and 128 px.
5. backbones: training images/s of efficientnet_lite1 and _lite2 divided by efficientnet_lite0's,
   channels-last, same batches, at 64 and 128 px: what a larger backbone costs.
6. ddp: `medtune train` with `train.processes` N (one per GPU; 2 on a CPU-only machine, gloo)
   against 1 process, same tiny project and global batch: the training images/s the stage itself
   reports. On GPUs this is DDP's speed-up; on a CPU it is only the overhead of splitting the
   same cores between processes.
7-12. What an append costs (each module's docstring says how): append and linear (bench/incremental.py:
   an append of k scans to n against the full ingest + validate + preprocess, and full runs at growing n),
   stability (bench/stability.py: images that change split over ten appends), warm_start
   (bench/warm_start.py: time to the champion's validation metric, warm vs cold start), noop and predict
   (bench/cheap.py: `retrain --once` with an empty inbox; `medtune predict` against ONNX Runtime alone).
13. tune (bench/tune.py): the same `medtune tune` trials with --jobs 1 and --jobs 2, trials per minute.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from components.data.augment import build_transform
from components.model.fit import make_loader
from components.model.models import Deployed, build_model
from components.params import Params

BATCH = 32


def _steps_per_second(model, batches, steps: int) -> float:
    """Images/s of `steps` SGD steps over an iterator of (x, y) batches, after one warm-up step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    it = iter(batches)
    seen, start = 0, None
    for i in range(steps + 1):
        x, y = next(it)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i == 0:
            start = time.perf_counter()
        else:
            seen += len(y)
    return seen / (time.perf_counter() - start)


def _best_of(rounds: int, **rates: Callable[[], float]) -> dict[str, float]:
    """Each rate's best over `rounds`, measured in alternation: a 2-core machine's speed drifts
    (turbo, other processes) more than the differences being measured."""
    best = dict.fromkeys(rates, 0.0)
    for _ in range(rounds):
        for name, rate in rates.items():
            best[name] = max(best[name], rate())
    return best


def bench_data(size: int = 64, n: int = 640, steps: int = 16) -> None:
    """Same model, same steps, three sources of the same training batches (see the module doc)."""
    params = Params()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.npy"
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 1, size, size))
        mm[:] = rng.integers(0, 256, mm.shape, dtype=np.uint8)
        mm.flush()
        del mm
        images = np.load(path, mmap_mode="r")
        model, _ = build_model("efficientnet_lite0", 2, 1, pretrained=True)
        transform = build_transform(params.augment)

        def rate(source) -> float:
            return _steps_per_second(
                model, _cycle(make_loader(source, labels, BATCH, train=True, transform=transform, seed=0)), steps
            )

        ram = torch.from_numpy(np.array(images))
        # Upper bound: the batches materialised beforehand (no data work at all during the steps).
        cached = [
            b
            for _, b in zip(
                range(steps + 1), make_loader(images, labels, BATCH, train=True, transform=transform, seed=0)
            )
        ]
        best = _best_of(
            3,
            real=lambda: rate(images),  # uint8 memmap on disk, decoded per image, augmented on the fly
            in_ram=lambda: rate(ram),  # the same tensors in RAM, same loader and augmentation
            bound=lambda: _steps_per_second(model, _cycle(cached), steps),
        )
        real, in_ram, bound = best["real"], best["in_ram"], best["bound"]
    what = f"efficientnet_lite0, {size} px, batch {BATCH}, best of 3 x {steps} steps, num_workers 0, {torch.get_num_threads()} threads"
    print(
        f"data   real path {real:6.1f} img/s | same tensors in RAM {in_ram:6.1f} img/s | ratio {real / in_ram:.3f} "
        f"(target >= 0.95; {what})"
    )
    print(
        f"data   real path {real:6.1f} img/s | pre-made batches {bound:6.1f} img/s | ratio {real / bound:.3f} "
        f"(the on-the-fly augmentation's share of a CPU step; a GPU run hides it behind loader workers)"
    )


def _cycle(batches):
    while True:
        yield from batches


def bench_onnx(size: int = 224, reps: int = 5) -> None:
    import onnxruntime as ort

    from components.release.export import export_onnx

    model, _ = build_model("efficientnet_lite0", 2, 1, pretrained=True)
    wrapper = Deployed(model).eval()
    x8 = np.random.default_rng(0).integers(0, 256, (BATCH, 1, size, size), dtype=np.uint8)
    x = x8.astype(np.float32) / 255.0
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "m.onnx"
        export_onnx(wrapper, x8, 17, onnx_path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    xt = torch.from_numpy(x)

    def torch_run():
        with torch.inference_mode():
            return wrapper(xt).numpy()

    def ort_run():
        return session.run(None, {"image": x})[0]

    t_torch, p_torch = _timed(torch_run, reps)
    t_ort, p_ort = _timed(ort_run, reps)
    diff = float(np.abs(p_torch - p_ort).max())
    print(
        f"onnx   onnxruntime {BATCH / t_ort:7.1f} img/s | torch eager {BATCH / t_torch:7.1f} img/s | "
        f"ratio {t_torch / t_ort:.2f} (target >= 1.5) | max |dp| {diff:.1e} "
        f"(efficientnet_lite0, {size} px, batch {BATCH}, best of {reps}, CPU, {torch.get_num_threads()} threads)"
    )


def _timed(fn, reps: int):
    out = fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def _workspace_tools():
    from tests.workspace import make_workspace, run, set_params  # run from the project root: `python -m bench`

    return make_workspace, run, set_params


def bench_dvc() -> None:
    make_workspace, run, _ = _workspace_tools()
    with tempfile.TemporaryDirectory() as tmp:
        ws = make_workspace(Path(tmp) / "ws", patients=12)
        start = time.perf_counter()
        run(["dvc", "repro"], ws)
        first = time.perf_counter() - start
        times = []
        for _ in range(3):
            start = time.perf_counter()
            out = run(["dvc", "repro"], ws)
            times.append(time.perf_counter() - start)
            assert "up to date" in out.stdout, out.stdout
    print(
        f"dvc    no-op dvc repro {min(times):.2f} s (best of 3; median {sorted(times)[1]:.2f} s) | "
        f"first full repro {first:.1f} s (7 stages, 36 synthetic 32 px DICOMs, 2 epochs)"
    )


def bench_layout(sizes: tuple[int, ...] = (64, 96, 128), steps: int = 6) -> None:
    """channels_last / NCHW training throughput, best of 2 alternating rounds per size."""
    rng = np.random.default_rng(0)
    for size in sizes:
        x = torch.from_numpy(rng.random((BATCH, 1, size, size), dtype=np.float32))
        y = torch.from_numpy(rng.integers(0, 2, BATCH))
        nchw, _ = build_model("efficientnet_lite0", 2, 1, pretrained=True)
        nhwc, _ = build_model("efficientnet_lite0", 2, 1, pretrained=True)
        nhwc.to(memory_format=torch.channels_last)
        x_last = x.contiguous(memory_format=torch.channels_last)
        best = _best_of(
            2,
            plain=lambda: _steps_per_second(nchw, _cycle([(x, y)]), steps),
            last=lambda: _steps_per_second(nhwc, _cycle([(x_last, y)]), steps),
        )
        plain, last = best["plain"], best["last"]
        print(
            f"layout {size:3d} px: channels_last {last:6.1f} img/s | NCHW {plain:6.1f} img/s | ratio "
            f"{last / plain:.2f} (efficientnet_lite0, batch {BATCH}, {torch.get_num_threads()} threads)"
        )


def bench_backbones(sizes: tuple[int, ...] = (64, 128), steps: int = 6) -> None:
    """Training throughput of the larger EfficientNet-Lites relative to lite0, best of 2 rounds."""
    rng = np.random.default_rng(0)
    for size in sizes:
        x = torch.from_numpy(rng.random((BATCH, 1, size, size), dtype=np.float32))
        batch = [(x.contiguous(memory_format=torch.channels_last), torch.from_numpy(rng.integers(0, 2, BATCH)))]
        models = {
            arch: build_model(arch, 2, 1, pretrained=True)[0].to(memory_format=torch.channels_last)
            for arch in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
        }
        speed = _best_of(
            2, **{arch: partial(_steps_per_second, model, _cycle(batch), steps) for arch, model in models.items()}
        )
        base = speed["efficientnet_lite0"]
        print(
            f"backbones {size:3d} px: "
            + " | ".join(
                f"{a.removeprefix('efficientnet_')} {v:6.1f} img/s ({base / v:.2f}x lite0's time)"
                for a, v in speed.items()
            )
            + f" (batch {BATCH}, channels_last, {torch.get_num_threads()} threads)"
        )


def bench_ddp(patients: int = 160, size: int = 64) -> None:
    """The train stage's own images/s (reports/train.json) with N processes and with 1."""
    gpus = torch.cuda.device_count()
    if gpus == 1:
        print("ddp    skipped: one GPU (DDP needs 2 or more; without any, it measures gloo on the CPU)")
        return
    make_workspace, run, set_params = _workspace_tools()
    n = gpus or 2
    train = {"backbone": "efficientnet_lite0", "pretrained": True, "epochs": 2, "batch_size": 16 * n, "patience": 5}
    with tempfile.TemporaryDirectory() as tmp:
        ws = make_workspace(
            Path(tmp) / "ws", patients=patients, params={"preprocess": {"image_size": size}, "train": train}
        )
        run(["dvc", "repro", "preprocess"], ws)
        rate, images = {}, 0
        for processes in (1, n, 1, n):  # alternated, best of 2: the machine's speed drifts
            set_params(ws, {"train": {"processes": processes}})
            run(["medtune", "train"], ws)
            summary = json.loads((ws / "reports" / "train.json").read_text())
            rate[processes] = max(rate.get(processes, 0.0), summary["throughput_img_s"])
            images = summary["n_train"]
    where = f"{n} GPUs, nccl" if gpus else f"CPU, gloo, {os.cpu_count()} cores"
    print(
        f"ddp    {n} processes {rate[n]:6.1f} img/s | 1 process {rate[1]:6.1f} img/s | ratio {rate[n] / rate[1]:.2f} "
        f"({where}; efficientnet_lite0, {size} px, global batch {train['batch_size']}, {images} training images, "
        "2 epochs, best of 2)"
    )


def _lazy(module: str, name: str) -> Callable[[], object]:
    """A benchmark of another bench module, imported only when it runs."""

    def run() -> object:
        import importlib

        return getattr(importlib.import_module(f"bench.{module}"), name)()

    return run


BENCHES: dict[str, Callable[[], object]] = {
    "data": bench_data,
    "onnx": bench_onnx,
    "dvc": bench_dvc,
    "layout": bench_layout,
    "backbones": bench_backbones,
    "ddp": bench_ddp,
    # Cost grows with what is new (docs/benchmarks.md, 'Appends'; docs/scaling.md).
    "append": _lazy("incremental", "bench_append"),
    "linear": _lazy("incremental", "bench_linear"),
    "stability": _lazy("stability", "bench_stability"),
    "warm_start": _lazy("warm_start", "bench_warm_start"),
    "noop": _lazy("cheap", "bench_noop_retrain"),
    "predict": _lazy("cheap", "bench_predict"),
    # `medtune tune` with trials at once (docs/tuning.md).
    "tune": _lazy("tune", "bench_tune_jobs"),
}
# Not in the default run (long; see docs/scaling.md): python -m bench.scale units | dvc N...


def main(argv: list[str]) -> int:
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    unknown = sorted(set(argv) - set(BENCHES))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; expected some of {list(BENCHES)}", file=sys.stderr)
        return 2
    print(
        f"medtune benchmarks: torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"cuda={'yes' if torch.cuda.is_available() else 'no'}"
    )
    for name in argv or list(BENCHES):
        BENCHES[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
