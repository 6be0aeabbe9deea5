"""What running `medtune tune` trials at once buys: the same number of trials with --jobs 1 and --jobs 2.

    python -c "from bench.tune import bench_tune_jobs; bench_tune_jobs()"

One tiny git+DVC project (tests.workspace: 8 demo patients, 32 px, backbone none, `train.epochs`
3), `dvc repro preprocess` committed as the base every trial shares. Then `medtune tune --trials N`
with --jobs 1 (study j1, tune.seed 100) and with --jobs 2 (study j2, tune.seed 200: other values, so
DVC's run cache restores nothing), each timed as a whole process. Printed: trials per minute of each
and their ratio (jobs 2 / jobs 1; > 1 means running trials at once pays on this machine), and how
many trials each left COMPLETE or PRUNED. Each trial is a `dvc exp run --temp train`, so the
measure includes DVC's temporary copy, the stage's start-up and the training.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import yaml

from tests.workspace import make_workspace, run

SPACE = {"train.lr": {"low": 0.0005, "high": 0.05, "log": True}, "train.dropout": {"choices": [0.0, 0.25]}}


def _set_tune(ws: Path, **tune) -> None:
    p = yaml.safe_load((ws / "params.yaml").read_text())
    p["tune"].update(tune)
    (ws / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    run(["git", "commit", "-qam", f"tune {tune.get('seed')}"], ws)


def _search(ws: Path, trials: int, jobs: int, study: str) -> tuple[float, str]:
    start = time.perf_counter()
    out = run(["medtune", "tune", "--trials", str(trials), "--jobs", str(jobs), "--study", study], ws)
    return time.perf_counter() - start, out.stdout


def bench_tune_jobs(trials: int = 4, epochs: int = 3) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ws = make_workspace(Path(tmp) / "ws", patients=8, params={"train": {"epochs": epochs}})
        p = yaml.safe_load((ws / "params.yaml").read_text())
        p["tune"]["space"] = SPACE
        (ws / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        run(["dvc", "repro", "preprocess"], ws)
        run(["git", "add", "-A"], ws)
        run(["git", "commit", "-qm", "base"], ws)
        result: dict = {"trials": trials, "epochs": epochs}
        for jobs, seed in ((1, 100), (2, 200)):
            _set_tune(ws, seed=seed)
            seconds, table = _search(ws, trials, jobs, f"j{jobs}")
            result[f"jobs{jobs}_s"] = round(seconds, 1)
            result[f"jobs{jobs}_trials_per_min"] = round(60 * trials / seconds, 2)
            result[f"jobs{jobs}_states"] = {s: table.count(s) for s in ("COMPLETE", "PRUNED", "FAIL")}
        result["speedup"] = round(result["jobs1_s"] / result["jobs2_s"], 2)
    print(
        f"tune: {trials} trials of {epochs} epochs, --jobs 1 {result['jobs1_s']} s, --jobs 2 {result['jobs2_s']} s: "
        f"{result['speedup']}x ({result['jobs1_states']} / {result['jobs2_states']})"
    )
    return result


if __name__ == "__main__":
    sys.exit(0 if bench_tune_jobs() else 1)
