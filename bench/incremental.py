"""What a run costs after an append, and how a full run grows with the number of scans.

    python -m bench.incremental append 20000 200            # 64 px PNGs (one in twenty a DICOM)
    python -m bench.incremental append 20000 200 dicom 256 0.999  # 256 px 16-bit DICOMs, as the demo's
    python -m bench.incremental linear 20000 40000 80000

`bench_append(n, k, kind, size)`: n synthetic scans, a full run of the ingest, validate and
preprocess stage functions, then k new scans and the same three again. kind "png": `size` px PNGs,
one in twenty a demo DICOM with a patient id (tiny per-scan work, so what grows with n weighs most:
the worst case for the ratio); kind "dicom": every scan a demo DICOM slice (components/data/demo_data.py,
16-bit CT-like, patient ids in the header), closer to real scans. Preprocess resizes to 64 px in both.
`correlation` is split.near_duplicate_correlation: the demo's synthetic bodies are so alike at 256 px
that at 0.99, with 20,000 scans, near-duplicate groups joined every patient into one unit (ingest
refused: no validation split), so the DICOM case runs at 0.999 (the search still considers every pair).
It prints and returns time(append) / time(full) (target <= 0.1), per stage, and whether
manifest.csv and manifest.json are the same bytes as a rebuild from scratch (no facts cache, the
previous manifest given, as the stable split needs it).

`bench_linear(sizes)`: a full ingest + preprocess of each size in a fresh subprocess; wall time
and peak RSS (resource.getrusage RUSAGE_CHILDREN ru_maxrss: the largest child so far, so sizes run
in increasing order), the time ratio per doubling (target <= 2.2) and the spread of peak RSS
(target: within 20% of the smallest). Wall times include the stages' process pools; the machine is
shared, so compare ratios measured within one run.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from components.data import demo_data, ingest, preprocess, validate
from components.params import parse_params

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("normal", "lesion")
DICOM_EVERY = 20  # kind "png": one scan in DICOM_EVERY is a DICOM (the demo generator's, with a PatientID)
KINDS = ("png", "dicom")
IMAGE_SIZE = 64  # preprocess.image_size


def _params(correlation: float = 0.99):
    return parse_params(
        {
            "data": {"patient_pattern": r"^(?P<patient>p\d+)_"},
            "split": {"near_duplicate_correlation": correlation},
            "validate": {"min_images_per_class_split": 1, "max_split_deviation": 0.5},
            "preprocess": {"image_size": IMAGE_SIZE},
        }
    )


def write_scans(raw: Path, first: int, count: int, kind: str = "png", size: int = 64) -> None:
    """`count` scans numbered from `first`, `size` px. kind "png": PNGs (a smooth random field plus
    noise, distinct by number, two per patient) and, for one in DICOM_EVERY, demo DICOM slices under
    their own patients; kind "dicom": demo DICOM slices only (two per patient)."""
    if kind not in KINDS:
        raise ValueError(f"bench.incremental: kind = {kind!r}; expected one of {KINDS}")
    patients = count // 2 if kind == "dicom" else count // DICOM_EVERY // 2
    n_dicom = 2 * patients
    if patients:
        demo_data.generate(
            raw, patients=patients, slices=2, size=size, seed=0, classes=list(CLASSES), patient_offset=first
        )  # case<number>_<slice>.dcm: new numbers, new files
    yy, xx = np.mgrid[0:size, 0:size] / size
    for n in range(first, first + count - n_dicom):
        rng = np.random.default_rng(n)
        a, b, c = rng.uniform(-1, 1, 3)
        field = 128 + 60 * np.sin(6 * (a * xx + b * yy) + c) + rng.normal(0, 20, (size, size))
        folder = raw / CLASSES[n % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).save(folder / f"p{n // 2:07d}_{n % 2}.png")


def _stages(raw: Path, data: Path, reports: Path, params, run_validate: bool = True) -> dict[str, float]:
    took = {}
    start = time.perf_counter()
    ingest.ingest(raw, data, params)
    took["ingest"] = time.perf_counter() - start
    if run_validate:
        start = time.perf_counter()
        validate.validate(
            data / "manifest.csv",
            data / "manifest.json",
            reports / "validation.json",
            reports / "validation.md",
            params,
        )
        took["validate"] = time.perf_counter() - start
    start = time.perf_counter()
    preprocess.preprocess(data / "manifest.csv", raw, data / "prepared", params)
    took["preprocess"] = time.perf_counter() - start
    return took


def _same_as_scratch(raw: Path, data: Path, previous_csv: Path, params, work: Path) -> bool:
    scratch = work / "scratch"
    scratch.mkdir()
    shutil.copy(previous_csv, scratch / "manifest.csv")
    ingest.ingest(raw, scratch, params, cache_dir=scratch / "empty-cache")
    return all((data / n).read_bytes() == (scratch / n).read_bytes() for n in ("manifest.csv", "manifest.json"))


def bench_append(n: int = 20000, k: int = 200, kind: str = "png", size: int = 64, correlation: float = 0.99) -> dict:
    params = _params(correlation)
    with tempfile.TemporaryDirectory(prefix="bench-incremental-") as tmp:
        work = Path(tmp)
        raw, data, reports = work / "raw", work / "data", work / "reports"
        write_scans(raw, 0, n, kind, size)
        time.sleep(2.5)  # older than stat_index.RACY_NS when ingest lists them, as scans usually are
        full = _stages(raw, data, reports, params)
        shutil.copy(data / "manifest.csv", work / "previous.csv")
        write_scans(raw, n, k, kind, size)
        time.sleep(2.5)
        append = _stages(raw, data, reports, params)
        same = _same_as_scratch(raw, data, work / "previous.csv", params, work)
    ratio = sum(append.values()) / sum(full.values())
    out = {
        "n": n,
        "k": k,
        "kind": kind,
        "size": size,
        "correlation": correlation,
        "full_s": round(sum(full.values()), 2),
        "append_s": round(sum(append.values()), 2),
        "ratio": round(ratio, 4),
        "same_as_scratch": same,
        "full": {s: round(t, 2) for s, t in full.items()},
        "append": {s: round(t, 2) for s, t in append.items()},
    }
    print(
        f"incremental append: {n} {size} px {kind} scans + {k} (near-duplicates at {correlation}): append {out['append_s']} s / full {out['full_s']} s = "
        f"{ratio:.3f} (target <= 0.1); per stage append/full "
        + ", ".join(f"{s} {append[s]:.2f}/{full[s]:.2f}" for s in full)
        + f"; manifest same bytes as from scratch: {same}"
    )
    return out


def _full_run(n: int, folder: str) -> None:
    """One full ingest + preprocess of n fresh scans (in a child process, for bench_linear)."""
    work = Path(folder)
    write_scans(work / "raw", 0, n)
    time.sleep(2.5)
    params = _params()
    start = time.perf_counter()
    _stages(work / "raw", work / "data", work / "reports", params, run_validate=False)
    # This process's own peak (the stages; their pool workers are other processes).
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - start,
                "self_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def bench_linear(sizes: tuple[int, ...] = (20000, 40000, 80000)) -> dict:
    rows = []
    for n in sorted(sizes):
        with tempfile.TemporaryDirectory(prefix="bench-linear-") as tmp:
            code = f"from bench.incremental import _full_run; _full_run({n}, {tmp!r})"
            out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"full run of {n} scans failed: {out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            # ru_maxrss of children: the largest so far (KiB on Linux); sizes grow, so it is this run's.
            rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            rows.append(
                {
                    "n": n,
                    "seconds": round(result["seconds"], 2),
                    "peak_rss_mib": round(rss, 1),
                    "stage_process_rss_mib": round(result["self_rss_mib"], 1),
                }
            )
    per_doubling = [
        round(float((b["seconds"] / a["seconds"]) ** (1 / np.log2(b["n"] / a["n"]))), 3) for a, b in zip(rows, rows[1:])
    ]
    spread = round(max(r["peak_rss_mib"] for r in rows) / min(r["peak_rss_mib"] for r in rows) - 1, 3)
    print(
        "incremental linear: "
        + ", ".join(
            f"{r['n']} scans {r['seconds']} s {r['peak_rss_mib']} MiB (stage process {r['stage_process_rss_mib']} MiB)"
            for r in rows
        )
        + f"; time ratio per doubling {per_doubling} (target <= 2.2); peak RSS spread {spread:.0%} (target <= 20%)"
    )
    return {"sizes": rows, "time_ratio_per_doubling": per_doubling, "rss_spread": spread}


if __name__ == "__main__":
    what, *numbers = sys.argv[1:] or ["append"]
    if what == "append":
        n, k, kind, size, corr = [*numbers, *["20000", "200", "png", "64", "0.99"][len(numbers) :]]
        bench_append(int(n), int(k), kind, int(size), float(corr))
    else:
        bench_linear(tuple(int(x) for x in numbers) or (20000, 40000, 80000))
