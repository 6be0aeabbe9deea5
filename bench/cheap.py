"""What the cheap commands cost, as a whole process: an empty inbox, and `medtune predict`.

    python -c "from bench.cheap import bench_noop_retrain, bench_predict; bench_noop_retrain(); bench_predict()"

1. noop_retrain: wall time of `medtune retrain --once` in a temporary project whose inbox is empty
   (params.yaml only; no PREFECT_API_URL, a fresh PREFECT_HOME), best of 3. Target < 2 s.
2. predict: `medtune predict` over N generated 256 px PNGs with a demo-size model (efficientnet_lite0,
   random weights, 64 px by default, 1 channel, exported like `medtune export` with its metadata): N / the whole
   process's wall time, divided by ONNX Runtime's own images/s on the same prepared tensors in one
   session (components.release.onnx_runtime.make_session, the same batch size; the better of its default
   session and one without spin-waiting threads). Best of 3 each, in alternating rounds. Target >= 0.8.
   Also printed: the process's fixed start-up (one file) and the rate past it. On 2 cores the two
   share the CPU: the ratio cannot exceed ORT's CPU time / (ORT's + decoding's) per image, so a
   small model (64 px) bounds it lower than a larger one (`bench_predict(size=128)`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BATCH = 32


def _env(prefect_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
    )
    return env


def _best_wall(cmd: list[str], cwd: Path, env: dict[str, str], reps: int = 3) -> tuple[float, str]:
    best, out = float("inf"), ""
    for _ in range(reps):
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        best, out = min(best, elapsed), proc.stdout + proc.stderr
    return best, out


def bench_noop_retrain(reps: int = 3) -> dict:
    with tempfile.TemporaryDirectory(prefix="medtune-bench-") as tmp:
        ws = Path(tmp) / "ws"
        (ws / "data" / "inbox").mkdir(parents=True)
        shutil.copy(ROOT / "params.yaml", ws)
        best, out = _best_wall([str(BIN / "medtune"), "retrain", "--once"], ws, _env(Path(tmp) / "prefect"), reps)
    said = next((line for line in out.splitlines() if "nothing to do" in line), "").strip()
    print(
        f"noop_retrain  medtune retrain --once, empty inbox: {best:.2f} s (best of {reps}; target < 2 s) | "
        f"said: {said!r}"
    )
    return {"seconds": round(best, 3), "target_seconds": 2.0}


def demo_model(path: Path, size: int = 64) -> Path:
    """efficientnet_lite0 (random weights), 1 channel, `size` px, exported like `medtune export`."""
    import onnx

    from components.model.models import Deployed, build_model
    from components.release.export import export_onnx

    model, _ = build_model("efficientnet_lite0", 2, 1, pretrained=False)
    example = np.zeros((1, 1, size, size), dtype=np.uint8)
    proto = export_onnx(Deployed(model).eval(), example, 17, path)
    props = {
        "model_id": "bench-demo",
        "classes": json.dumps(["normal", "lesion"]),
        "output": "probabilities",
        "input": json.dumps({"name": "image", "shape": ["batch", 1, size, size], "dtype": "float32"}),
        "preprocessing": json.dumps({"image_size": size, "channels": 1, "window": "header", "equalize": False}),
    }
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path


def write_pngs(folder: Path, n: int, size: int = 256) -> list[Path]:
    """Scan-like PNGs: a smooth gradient plus noise (noise alone would make decoding unrealistically slow)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.arange(size), np.arange(size)) * (120 / size)
    paths = []
    for i in range(n):
        pixels = np.clip(ramp + rng.normal(0, 12, (size, size)) + (i % 7) * 5, 0, 255).astype(np.uint8)
        paths.append(folder / f"scan_{i:05d}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def _ort_seconds(sessions: dict, x: np.ndarray) -> dict[str, float]:
    """Seconds ONNX Runtime takes for `x` in batches of BATCH, per session."""
    out = {}
    for name, session in sessions.items():
        start = time.perf_counter()
        for i in range(0, len(x), BATCH):
            session.run(None, {"image": x[i : i + BATCH]})
        out[name] = time.perf_counter() - start
    return out


def bench_predict(n: int = 512, reps: int = 3, size: int = 64) -> dict:
    """Whole `medtune predict` processes against ONNX Runtime on the same prepared tensors, in
    alternating rounds (the machine's speed drifts), best of `reps` each. ONNX Runtime's rate is the
    better of its default session and one without spin-waiting threads (what predict uses)."""
    from components.data.scans import prepare_image
    from components.release.onnx_runtime import make_session
    from components.release.predict import open_model

    with tempfile.TemporaryDirectory(prefix="medtune-bench-") as tmp:
        tmp = Path(tmp)
        model = demo_model(tmp / "model.onnx", size)
        files = write_pngs(tmp / "scans", n)
        (tmp / "one").mkdir()
        shutil.copy(files[0], tmp / "one")
        env = _env(tmp / "prefect")
        settings = open_model(model)[1]["preparation"]
        x = np.stack([prepare_image(f, **settings) for f in files]).astype(np.float32) / 255.0
        sessions = {"default": make_session(model), "no-spin": make_session(model, spinning=False)}
        _ort_seconds(sessions, x[:BATCH])  # warm-up
        best: dict[str, float] = {}
        for _ in range(reps):
            for what in ("one", "scans"):
                cmd = [
                    str(BIN / "medtune"),
                    "predict",
                    str(model),
                    str(tmp / what),
                    "-o",
                    str(tmp / "p.csv"),
                    "--batch-size",
                    str(BATCH),
                ]
                best[what] = min(best.get(what, float("inf")), _best_wall(cmd, tmp, env, 1)[0])
            for name, seconds in _ort_seconds(sessions, x).items():
                best[name] = min(best.get(name, float("inf")), seconds)
    ort = n / min(best["default"], best["no-spin"])
    rate = n / best["scans"]
    steady = (n - 1) / max(best["scans"] - best["one"], 1e-9)
    print(
        f"predict  medtune predict {rate:6.1f} img/s (whole process, {best['scans']:.2f} s for {n} 256 px PNGs) | "
        f"onnxruntime {ort:6.1f} img/s (same tensors, one session; default {n / best['default']:.0f}, no-spin "
        f"{n / best['no-spin']:.0f}) | ratio {rate / ort:.2f} (target >= 0.8) | start-up {best['one']:.2f} s "
        f"(one file); past it {steady:.0f} img/s, {steady / ort:.2f}x (efficientnet_lite0, {size} px, batch {BATCH}, "
        f"best of {reps}, CPU)"
    )
    return {
        "predict_img_s": round(rate, 1),
        "ort_img_s": round(ort, 1),
        "ratio": round(rate / ort, 3),
        "seconds": round(best["scans"], 3),
        "startup_seconds": round(best["one"], 3),
        "steady_img_s": round(steady, 1),
        "steady_ratio": round(steady / ort, 3),
        "n": n,
        "model_px": size,
        "target_ratio": 0.8,
    }


if __name__ == "__main__":
    bench_noop_retrain()
    bench_predict()
