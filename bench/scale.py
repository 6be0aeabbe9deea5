"""What one scan, one near-duplicate pair, one training image and one DVC-tracked file cost here:
the unit costs docs/scaling.md projects to 1M and 10M scans from.

    python -m bench.scale units            # per-scan, per-pair, per-image and fixed costs, ~5 min
    python -m bench.scale dvc 10000 30000  # DVC add/status/push at these file counts, both layouts

Each function prints one result line and returns a dict of the figures (seconds unless named
otherwise). Other processes share the 2 cores, so every repeatable measurement is the best of a few
runs (`_best`); a first `dvc add` or `dvc push` cannot be repeated on the same repo and is run once.

DVC layouts compared (`bench_dvc_files`):
- "one": the whole raw folder is one DVC-tracked directory (data/raw.dvc, as the pipeline flow's
  `dvc add data/raw` makes it); an append adds a batch sub-folder and `dvc add data/raw` again.
- "per_batch": each batch folder is its own .dvc (data/raw/b0000.dvc, ...); an append adds one new
  folder and `dvc add` of that folder alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FILE_BYTES = 2048
PER_FOLDER = 1000


def _best(fn: Callable[[], Any], reps: int = 3) -> float:
    """Best wall time of `reps` calls (the machine is shared: the fastest run is the least disturbed)."""
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "b",
        "GIT_AUTHOR_EMAIL": "b@b",
        "GIT_COMMITTER_NAME": "b",
        "GIT_COMMITTER_EMAIL": "b@b",
    }


def _run(cwd: Path, *argv: str) -> float:
    """Wall time of one command; raises with its output when it fails."""
    start = time.perf_counter()
    out = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True)
    took = time.perf_counter() - start
    if out.returncode:
        raise RuntimeError(
            f"{' '.join(argv)} in {cwd} failed ({out.returncode}): {out.stdout[-2000:]}{out.stderr[-2000:]}"
        )
    return took


# ---------------------------------------------------------------------------------------------
# DVC at many small files
# ---------------------------------------------------------------------------------------------


def _write_folder(folder: Path, n: int, seed: int) -> None:
    """n distinct FILE_BYTES files (random bytes: no two share a DVC cache object)."""
    folder.mkdir(parents=True)
    data = np.random.default_rng(seed).integers(0, 256, (n, FILE_BYTES), dtype=np.uint8)
    for i in range(n):
        (folder / f"s{i:05d}.bin").write_bytes(data[i].tobytes())


def _dvc_repo(root: Path) -> None:
    root.mkdir(parents=True)
    _run(root, "git", "init", "-q")
    _run(root, "dvc", "init", "-q")
    _run(root, "dvc", "config", "core.check_update", "false")
    remote = root.parent / f"{root.name}-remote"
    _run(root, "dvc", "remote", "add", "-d", "local", str(remote))


def _tree_stats(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def _layout_run(root: Path, n: int, layout: str) -> dict[str, float]:
    """add / status / append+add / push / push-after-append for one layout in a fresh repo at root."""
    _dvc_repo(root)
    raw = root / "data" / "raw"
    batches = [raw / f"b{i:04d}" for i in range(-(-n // PER_FOLDER))]
    for i, folder in enumerate(batches):
        _write_folder(folder, min(PER_FOLDER, n - i * PER_FOLDER), seed=i)
    targets = ["data/raw"] if layout == "one" else [str(b.relative_to(root)) for b in batches]
    r: dict[str, float] = {"add_first": _run(root, "dvc", "add", "-q", *targets)}
    _run(root, "git", "add", "-A")
    _run(root, "git", "commit", "-qm", "data")
    r["status_noop"] = _best(lambda: _run(root, "dvc", "status"))
    r["push_first"] = _run(root, "dvc", "push", "-q")
    # A pipeline stage that depends on the whole raw folder (as ingest and preprocess do): DVC then
    # checks every file's entry in its state database on each `dvc status` / `dvc repro`.
    (root / "dvc.yaml").write_text("stages:\n  ingest:\n    cmd: 'true'\n    deps: [data/raw]\n")
    r["repro_stage_first"] = _run(root, "dvc", "repro", "-q")
    r["status_with_stage"] = _best(lambda: _run(root, "dvc", "status"))
    new = raw / f"b{len(batches):04d}"
    _write_folder(new, max(1, n // 100), seed=len(batches))  # the 1% append: one new batch folder
    r["add_append"] = _run(root, "dvc", "add", "-q", "data/raw" if layout == "one" else str(new.relative_to(root)))
    r["status_after_append"] = _best(lambda: _run(root, "dvc", "status"))
    r["repro_stage_append"] = _run(root, "dvc", "repro", "-q")
    r["push_append"] = _run(root, "dvc", "push", "-q")
    files, size = _tree_stats(root / ".dvc" / "cache")
    r.update(cache_files=files, cache_mb=size / 1e6)
    return r


def bench_dvc_files(n: int = 100_000, layouts: tuple[str, ...] = ("one", "per_batch")) -> dict[str, Any]:
    """DVC's own costs at n files of FILE_BYTES in folders of PER_FOLDER, for each layout."""
    out: dict[str, Any] = {"n": n, "file_bytes": FILE_BYTES, "per_folder": PER_FOLDER}
    with tempfile.TemporaryDirectory(prefix="medtune-scale-", dir=os.environ.get("MEDTUNE_BENCH_TMP")) as tmp:
        for layout in layouts:
            out[layout] = _layout_run(Path(tmp) / layout, n, layout)
            for leftover in (layout, f"{layout}-remote"):
                shutil.rmtree(Path(tmp) / leftover, ignore_errors=True)
    line = " | ".join(
        f"{k}: add {v['add_first']:.1f} s, status {v['status_noop']:.2f} s (with a stage on data/raw {v['status_with_stage']:.2f} s), add 1% {v['add_append']:.1f} s, "
        f"push {v['push_first']:.1f} s, push 1% {v['push_append']:.1f} s, cache {v['cache_files']} files"
        for k, v in out.items()
        if isinstance(v, dict)
    )
    print(f"dvc-files n={n}: {line}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# Per-scan, per-pair, per-image and fixed costs
# ---------------------------------------------------------------------------------------------


def _scan_files(folder: Path, n: int, size: int) -> dict[str, list[Path]]:
    """n synthetic CT DICOMs (components.data.demo_data) and the same pixels as 8-bit PNGs."""
    from PIL import Image

    from components.data import demo_data, scans

    dcm_dir, png_dir = folder / f"dcm{size}", folder / f"png{size}"
    demo_data.generate(dcm_dir, patients=max(1, n // 10), slices=10, size=size, seed=0, classes=["a", "b"])
    dicoms = sorted(dcm_dir.rglob("*.dcm"))[:n]
    png_dir.mkdir(parents=True)
    pngs = []
    for i, p in enumerate(dicoms):
        pngs.append(png_dir / f"{i:05d}.png")
        Image.fromarray(scans.load_pixels(p, "header", 1)[..., 0]).save(pngs[-1])
    return {"dicom": dicoms, "png": pngs}


def _per_file(fn: Callable[[Path], Any], files: list[Path], reps: int = 3) -> float:
    return _best(lambda: [fn(f) for f in files], reps) / len(files)


def _unit_scan_costs(folder: Path, n: int) -> dict[str, float]:
    from components import common
    from components.data import scan_info, scans
    from components.data.preprocess import preparation
    from components.params import Params

    settings = preparation(Params().preprocess)
    out: dict[str, float] = {}
    for size in (256, 512):
        files = _scan_files(folder, n, size)
        for kind, paths in files.items():
            out[f"bytes_{kind}_{size}"] = float(np.mean([p.stat().st_size for p in paths]))
            out[f"sha256_{kind}_{size}"] = _per_file(common.sha256_file, paths)
            out[f"probe_{kind}_{size}"] = _per_file(scan_info.probe, paths)
            out[f"prepare_{kind}_{size}"] = _per_file(partial(scans.prepare_image, **settings), paths)
    return out


def _ct_thumbnails(n: int) -> np.ndarray:
    """n 32 px synthetic CT slices (components.data.demo_data's anatomy, 10 slices per patient): alike
    bodies, so the near-duplicate filter lets many pairs through (a hard case for it)."""
    from components.data import demo_data, scan_info

    out = []
    for number in range(-(-n // 10)):
        rng = np.random.default_rng([0, number])
        anatomy = demo_data._anatomy(rng)
        out += [
            demo_data._slice_hu(rng, anatomy, scan_info.THUMBNAIL, s / 9, lesion=number % 2 == 0) for s in range(10)
        ]
    return np.stack(out[:n]).astype(np.float32)


def _pair_cost(n: int, kind: str, reps: int = 2) -> float:
    """Seconds per compared pair: near_duplicates.pairs on n thumbnails / (n^2 / 2). kind "random":
    unrelated thumbnails (the filter rules out nearly all); "ct": synthetic CT slices."""
    from components.data import near_duplicates, scan_info

    thumbs = (
        _ct_thumbnails(n)
        if kind == "ct"
        else np.random.default_rng(n).random((n, scan_info.THUMBNAIL, scan_info.THUMBNAIL), dtype=np.float32)
    )
    x = near_duplicates.standardise(list(thumbs))
    return _best(lambda: near_duplicates.pairs(x, 0.99), reps) / (n * n / 2)


def _listing_cost(folder: Path, n: int = 20_000) -> dict[str, float]:
    """Per file: folders.list_folder (what ingest's find_scans walks) and one os.stat, on n small .dcm files."""
    from components.data import folders

    tree = folder / "listing"
    for b in range(-(-n // PER_FOLDER)):
        (tree / f"b{b:04d}").mkdir(parents=True)
        for i in range(min(PER_FOLDER, n - b * PER_FOLDER)):
            (tree / f"b{b:04d}" / f"s{i:05d}.dcm").write_bytes(b"x")
    paths = [tree / rel for rel in folders.list_folder(tree).scans]
    return {
        "list_per_file": _best(lambda: folders.list_folder(tree)) / n,
        "stat_per_file": _best(lambda: [os.stat(p) for p in paths]) / n,
    }


def _validate_costs(sizes: tuple[int, ...] = (20_000, 100_000)) -> dict[str, float]:
    """validate.run_suite (Great Expectations over the manifest) on generated manifests of each size."""
    import pandas as pd

    from components.data.manifest import COLUMNS
    from components.params import Params

    out = {}
    for n in sizes:
        rng = np.random.default_rng(n)
        patients = rng.integers(0, n // 10, n)
        split = np.array(["train", "val", "test"])[patients % 5 % 3]
        df = pd.DataFrame(
            {
                "path": [f"{c}/b/s{i:07d}.dcm" for i, c in enumerate(rng.choice(["normal", "lesion"], n))],
                "sha256": [f"{i:064x}" for i in range(n)],
                "patient": [f"{p:016x}" for p in patients],
                "width": "512",
                "height": "512",
                "channels": "1",
                "bit_depth": "16",
                "modality": "CT",
                "similar_group": "",
                "split": split,
                "error": "",
            }
        )
        df["label"] = df["path"].str.split("/").str[0]
        run = partial(__import__("components.data.validate", fromlist=["run_suite"]).run_suite, df[COLUMNS], Params())
        out[f"validate_{n}"] = _best(run, 2)
    return out


def _hash_throughput(mb: int = 64) -> dict[str, float]:
    """MB/s of md5 (what DVC hashes with) and sha256 (what ingest hashes with) over bytes in RAM."""
    import hashlib

    data = np.random.default_rng(0).integers(0, 256, mb << 20, dtype=np.uint8).tobytes()
    return {f"{name}_mb_s": mb / _best(lambda n=name: hashlib.new(n, data).digest()) for name in ("md5", "sha256")}


def _train_rate(size: int = 64, steps: int = 8) -> float:
    import torch

    from bench.__main__ import BATCH, _best_of, _cycle, _steps_per_second
    from components.model.models import build_model

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((BATCH, 1, size, size), dtype=np.float32)).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.from_numpy(rng.integers(0, 2, BATCH))
    model, _ = build_model("efficientnet_lite0", 2, 1, pretrained=True)
    model.to(memory_format=torch.channels_last)
    return _best_of(3, rate=lambda: _steps_per_second(model, _cycle([(x, y)]), steps))["rate"]


def _fixed_costs(folder: Path) -> dict[str, float]:
    py = sys.executable
    out = {
        "medtune_help": _best(lambda: _run(ROOT, str(BIN / "medtune"), "--help")),
        "import_ingest": _best(lambda: _run(ROOT, py, "-c", "import components.data.ingest")),
        "import_preprocess": _best(lambda: _run(ROOT, py, "-c", "import components.data.preprocess")),
        "python_bare": _best(lambda: _run(ROOT, py, "-c", "pass")),
    }
    from tests.workspace import make_workspace

    ws = make_workspace(folder / "ws", patients=12)
    _run(ws, "dvc", "repro", "-q")
    out["dvc_status_demo"] = _best(lambda: _run(ws, "dvc", "status"))
    out["dvc_repro_noop_demo"] = _best(lambda: _run(ws, "dvc", "repro", "-q"))
    return out


def bench_unit_costs(n_files: int = 200, pair_sizes: tuple[int, ...] = (4000, 8000)) -> dict[str, Any]:
    """Per-scan, per-pair, per-image and per-command costs on this machine (best of a few runs)."""
    import torch

    out: dict[str, Any] = {"n_files": n_files, "threads": torch.get_num_threads(), "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="medtune-units-") as tmp:
        out.update(_unit_scan_costs(Path(tmp), n_files))
        out.update({f"pair_{kind}_{n}": _pair_cost(n, kind) for n in pair_sizes for kind in ("random", "ct")})
        out.update(_listing_cost(Path(tmp)))
        out.update(_validate_costs())
        out.update(_hash_throughput())
        out["train_img_s_64"] = _train_rate()
        out.update(_fixed_costs(Path(tmp)))
    ms = {k: f"{v * 1e3:.2f}" for k, v in out.items() if k.startswith(("sha256", "probe", "prepare"))}
    print(
        f"units  per scan (ms, 1 process): {ms} | per pair {out[f'pair_random_{pair_sizes[-1]}'] * 1e9:.2f} ns (random) / {out[f'pair_ct_{pair_sizes[-1]}'] * 1e9:.2f} ns (CT slices) | "
        f"train {out['train_img_s_64']:.0f} img/s at 64 px | medtune --help {out['medtune_help']:.2f} s | "
        f"dvc status (demo) {out['dvc_status_demo']:.2f} s (best of 3 each)",
        flush=True,
    )
    return out


# ---------------------------------------------------------------------------------------------
# Projection (docs/scaling.md shows these formulas)
# ---------------------------------------------------------------------------------------------


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys = a + b * xs."""
    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(a), float(b)


def dvc_fits(runs: list[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per layout and command, (fixed s, s per file) fitted over the file counts measured."""
    layouts = [k for k, v in runs[0].items() if isinstance(v, dict)]
    keys = [k for k in runs[0][layouts[0]] if not k.startswith("cache")]
    return {lay: {k: fit_line([r["n"] for r in runs], [r[lay][k] for r in runs]) for k in keys} for lay in layouts}


def project(
    u: dict[str, float],
    n: int,
    cores: int,
    kind: str = "dicom_512",
    pair_kind: str = "ct",
    epochs: int = 1,
    train_fraction: float = 0.6,
) -> dict[str, dict[str, float]]:
    """Seconds per pipeline part for an append of 1% (k = n / 100) and a full build of n scans, with
    per-file work divided over `cores` and the near-duplicate products over min(cores, 16) BLAS
    threads (measured with 2). u: bench_unit_costs()'s dict (plus _listing_cost's)."""
    k, pair = n / 100, u[f"pair_{pair_kind}_8000"] * 2 / min(cores, 16)
    hash_probe, hash_prep = u[f"sha256_{kind}"] + u[f"probe_{kind}"], u[f"sha256_{kind}"] + u[f"prepare_{kind}"]
    a, b = fit_line([20_000, 100_000], [u["validate_20000"], u["validate_100000"]])
    listing = (u["list_per_file"] + u["stat_per_file"]) * n  # walked in one process
    per_epoch = train_fraction * n / (u["train_img_s_64"] * cores / 2)
    return {
        "append": {
            "list_and_stat": listing,
            "hash_probe_new": hash_probe * k / cores,
            "near_dups_k_x_n": pair * k * n,
            "validate": a + b * n,
            "rehash_all_in_preprocess": u[f"sha256_{kind}"] * n / cores,
            "prepare_new": u[f"prepare_{kind}"] * k / cores,
            "train_epoch": per_epoch * epochs,
        },
        "full": {
            "list_and_stat": listing,
            "hash_probe_all": hash_probe * n / cores,
            "near_dups_n2_half": pair * n * n / 2,
            "validate": a + b * n,
            "hash_prepare_all": hash_prep * n / cores,
            "train_epoch": per_epoch * epochs,
        },
    }


def main(argv: list[str]) -> int:
    import json

    what, *sizes = argv or ["units"]
    results = bench_unit_costs() if what == "units" else [bench_dvc_files(int(s)) for s in (sizes or ["100000"])]
    print(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
