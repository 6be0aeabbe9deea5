"""Shared by the bench/quality scripts: a real git + DVC medtune project per data set, experiments
run with `dvc exp run -S ...` (so each one is recorded, `dvc exp show` lists them), and a results
table (metric, interval, seeds, wall time, machine) written to bench/quality/results/.

The scripts read ../shared/datasets and print a skip message when it is absent; nothing here is
needed by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from components import common
from components.presets import flatten, preset, set_flags
from tests.workspace import merge, run, tool_env  # shared with the integration tests

ROOT = Path(__file__).resolve().parents[2]
BENCH_SALT = secrets.token_hex(32)
DATASETS = Path(os.environ.get("MEDTUNE_DATASETS", ROOT.parent / "shared" / "datasets"))
RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(__file__).resolve().parent / ".work"  # git-ignored; kept so DVC's run cache is reused


def dataset(rel: str) -> Path | None:
    """../shared/datasets/<rel>, or None after printing why the benchmark is skipped."""
    path = DATASETS / rel
    if not path.exists():
        print(
            f"skipped: {path} not found (the real data sets live in ../shared/datasets; set MEDTUNE_DATASETS "
            "to another copy)"
        )
        return None
    return path


def make_project(
    name: str, import_cmd: list[str] | Callable[[Path], None], params: dict[str, Any], fresh: bool = False
) -> Path:
    """A git + DVC project in bench/quality/.work/<name>: dvc.yaml, the stage code, params.yaml =
    the project's params.yaml merged with `params`, data/raw from `import_cmd` (a command run in
    the project, or a function given the project folder) under `dvc add`."""
    ws = WORK / name
    if fresh and ws.exists():
        shutil.rmtree(ws)
    ws.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dvc.yaml", ws)
    shutil.copytree(
        ROOT / "components", ws / "components", dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
    )
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    # Benchmarks measure, they do not release: an open gate lets every run reach export.
    open_gate = {
        "evaluate": {
            "gate": {"min_auroc": 0.0, "min_sensitivity": 0.0, "min_specificity": 0.0, "min_balanced_accuracy": 0.0}
        }
    }
    (ws / "params.yaml").write_text(yaml.safe_dump(merge(merge(base, open_gate), params), sort_keys=False))
    if not (ws / ".git").is_dir():
        run(["git", "init", "-q"], ws)
        run(["dvc", "init", "-q"], ws)
    if not (ws / "data/raw.dvc").is_file():
        import_cmd(ws) if callable(import_cmd) else run(import_cmd, ws)
        run(["dvc", "add", "-q", "data/raw"], ws)
    # Pipeline outputs stay out of git: dvc.lock versions them, and `dvc exp show` reads the metrics
    # (DVC-cached) from the cache.
    cached = sorted(common.dvc_pipeline_paths(ws)["outs"])
    (ws / ".gitignore").write_text("".join(f"/{p}\n" for p in [*cached, "reports/train.json"]))
    run(["git", "rm", "-r", "-q", "--cached", "--ignore-unmatch", *cached], ws)
    run(["git", "add", "-A"], ws)
    run(["git", "commit", "-qm", "baseline", "--allow-empty"], ws)
    return ws


def exp_run(ws: Path, name: str, sets: dict[str, Any]) -> dict[str, Any]:
    """`dvc exp run -n name -S k=v ...` from the committed baseline params; returns one result row."""
    run(["git", "checkout", "-q", "--", "params.yaml"], ws)
    args = set_flags(sets)
    start = time.perf_counter()
    # PYTHONPATH: the stages import the project's copy of components/ (what dvc.lock hashes), not
    # the checkout's editable install, so a run records exactly the code it ran.
    # A salt of this process alone: the results files keep hashed patients (for patient-level
    # bootstraps), and with the public salt anyone holding the headers could re-identify them.
    out = run(
        ["dvc", "exp", "run", "-n", name, *args],
        ws,
        env=tool_env(PYTHONPATH=str(ws), MEDTUNE_PATIENT_SALT=BENCH_SALT),
        check=False,
    )
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"dvc exp run {name} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    metrics = json.loads((ws / "reports/evaluation.json").read_text())  # the whole record: CI, calibration
    train = json.loads((ws / "reports/train.json").read_text())
    return {"name": name, "sets": sets, "seconds": round(seconds, 1), "metrics": metrics, "train": train}


def recipe_args(description: str, recipes: dict[str, Any], argv: list[str] | None, seeds: list[int]) -> Any:
    """The command line every bench/quality script takes: --recipe (repeatable), --seeds, --table-only."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--recipe", action="append", choices=list(recipes), help="recipe to run (repeatable; default: all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=seeds, help=f"train.seed values (default {seeds})")
    ap.add_argument("--table-only", action="store_true", help="rewrite the table from the recorded runs")
    return ap.parse_args(argv)


def recipe_sets(preset_name: str | None, **extra: Any) -> dict[str, Any]:
    """Dotted `-S` overrides: a named preset (components/presets.yaml), then `extra`."""
    return {**(flatten(preset(preset_name)) if preset_name else {}), **extra}


def exp_name(recipe: str, seed: int, suffix: str = "") -> str:
    """A DVC experiment name (no spaces or punctuation) for one recipe and seed."""
    return f"{''.join(c if c.isalnum() else '-' for c in recipe)}-s{seed}{suffix}"


def run_recipes(
    ws: Path,
    name: str,
    recipes: dict[str, dict[str, Any]],
    labels: list[str] | None,
    seeds: list[int],
    folds: int | None = None,
    extra_row: Callable[[Path], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Each recipe ({"preset": name, "sets": {dotted: value}}) x each seed (x each split.test_fold
    when `folds` is given) as one `dvc exp run`; every run is recorded in results/<name>.json as
    soon as it ends, with `extra_row(ws)` added. Returns all recorded runs."""
    runs: list[dict[str, Any]] = []
    for label in labels or list(recipes):
        recipe = recipes[label]
        for seed in seeds:
            for fold in range(folds) if folds else [None]:
                more = (
                    {"train.seed": seed}
                    if fold is None
                    else {"train.seed": seed, "split.method": "stratified", "split.test_fold": fold}
                )
                sets = recipe_sets(recipe.get("preset"), **recipe.get("sets", {}), **more)
                exp = exp_name(label, seed, "" if fold is None else f"-fold{fold}")
                print(f"running {exp}: {sets}", flush=True)
                row = exp_run(ws, exp, sets)
                shown = [f"{k} {v:.4f}" for k, v in row["metrics"].items() if k in ("auroc", "accuracy", "mae", "r2")]
                print(f"  {' '.join(shown)} in {row['seconds']:.0f} s", flush=True)
                extra = {"seed": seed, "fold": fold, **(extra_row(ws) if extra_row else {})}
                runs = record(name, label, {**row, **extra})
    return runs


def experiments(ws: Path) -> list[str]:
    """The git refs of the project's DVC experiments (refs/exps/..., without DVC's own exec refs), sorted."""
    refs = run(["git", "for-each-ref", "refs/exps", "--format=%(refname)"], ws).stdout.split()
    return sorted(r for r in refs if not r.startswith("refs/exps/exec/"))


def recorded(name: str) -> list[dict[str, Any]]:
    from components.common import read_json

    path = RESULTS / f"{name}.json"
    return read_json(path)["runs"] if path.is_file() else []


def mean_sd(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def machine() -> str:
    import torch

    from components.common import processor

    cpu = processor()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}"
    )


def _epochs(train: dict[str, Any]) -> str:
    """best/run epochs; for an ensemble (lists, one per member) each member's, joined by '+'."""
    best, ran = train["best_epoch"], train["epochs_run"]
    if isinstance(best, list):
        return "(" + " + ".join(f"{b}/{r}" for b, r in zip(best, ran)) + ")"
    return f"{best}/{ran}"


def summary_row(label: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± SD over the seeds of one recipe, and the per-seed AUROC intervals."""
    m = [r["metrics"] for r in rows]
    return {
        "recipe": label,
        "seeds": len(rows),
        "auroc": mean_sd([x["auroc"] for x in m]),
        "auroc_ci": "; ".join(f"{x['auroc_ci'][0]:.3f}-{x['auroc_ci'][1]:.3f}" for x in m),
        "accuracy": mean_sd([x["accuracy"] for x in m]),
        "sensitivity": mean_sd([x["sensitivity"] for x in m]),
        "specificity": mean_sd([x["specificity"] for x in m]),
        "ece": (
            mean_sd([x["calibration"]["test"]["ece_before"] for x in m])
            + " → "
            + mean_sd([x["calibration"]["test"]["ece_after"] for x in m])
        ),
        "brier": (
            mean_sd([x["calibration"]["test"]["brier_before"] for x in m])
            + " → "
            + mean_sd([x["calibration"]["test"]["brier_after"] for x in m])
        ),
        "epochs": ", ".join(_epochs(r["train"]) for r in rows),
        "wall_s": mean_sd([r["seconds"] for r in rows], digits=0),
    }


COLUMNS = (
    "recipe",
    "seeds",
    "auroc",
    "auroc_ci",
    "accuracy",
    "sensitivity",
    "specificity",
    "ece",
    "brier",
    "epochs",
    "wall_s",
)
HEADERS = (
    "recipe",
    "seeds",
    "test AUROC (mean ± SD)",
    "95% CI per seed (bootstrap)",
    "accuracy",
    "sensitivity",
    "specificity",
    "ECE before → after calibration",
    "Brier before → after",
    "best/run epochs",
    "wall time per run, s",
)


def record(name: str, recipe: str, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Add one run to bench/quality/results/<name>.json (replacing an earlier run of the same
    experiment name), so recipes can be run one at a time; returns every recorded run."""
    from components.common import write_json

    path, runs = RESULTS / f"{name}.json", recorded(name)
    runs = [r for r in runs if r["name"] != row["name"]] + [
        {**row, "recipe": recipe, "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    ]
    write_json(path, {"runs": runs})
    return runs


def write_table(
    name: str, title: str, runs: list[dict[str, Any]], published: list[tuple[str, str, str]], notes: list[str]
) -> Path:
    """bench/quality/results/<name>.md from every recorded run, one row per recipe (mean ± SD over seeds)."""
    from components.common import write_text

    recipes = list(dict.fromkeys(r["recipe"] for r in runs))
    machines = sorted({r["machine"] for r in runs})
    # Runs from more than one machine: name each by a letter and say per row which ran it (seeded CPU
    # training is deterministic on one machine, not across processors).
    letter = {m: chr(ord("A") + i) for i, m in enumerate(machines)}
    several = len(machines) > 1
    where = "; ".join(f"{letter[m]} = {m}" for m in machines) if several else machines[0]
    headers = HEADERS + (("machine, per seed",) if several else ())
    lines = [
        f"# {title}",
        "",
        f"Runs recorded by `dvc exp run` in bench/quality/.work/{name}; "
        f"machine{'s' if several else ''}: {where}; dates {', '.join(sorted({r['date'] for r in runs}))}.",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
    ]
    for recipe in recipes:
        rows = [r for r in runs if r["recipe"] == recipe]
        row = summary_row(recipe, rows)
        cells = [str(row[c]) for c in COLUMNS] + ([", ".join(letter[r["machine"]] for r in rows)] if several else [])
        lines.append("| " + " | ".join(cells) + " |")
    if published:
        lines += ["", "Published:", "", "| model | AUROC | ACC |", "|---|---|---|"]
        lines += [f"| {m} | {a} | {b} |" for m, a, b in published]
    lines += ["", *notes, ""]
    path = RESULTS / f"{name}.md"
    write_text(path, "\n".join(lines))
    print("\n".join(lines))
    return path


def patient_bootstrap(
    pooled: pd.DataFrame, stats: dict[str, Callable[[pd.DataFrame], float | None]], n: int = 2000, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """95% intervals of each of `stats` over `n` resamples of the patients of pooled out-of-fold rows
    (a `patient` column; a patient's slices are drawn together). A stat that is undefined on a
    resample (None: an AUROC of one class) leaves that resample out of its interval."""
    rng = np.random.default_rng(seed)
    groups = [g for _, g in pooled.groupby("patient")]
    values: dict[str, list[float]] = {k: [] for k in stats}
    for _ in range(n):
        sample = pd.concat([groups[i] for i in rng.integers(0, len(groups), len(groups))])
        for k, stat in stats.items():
            if (v := stat(sample)) is not None:
                values[k].append(float(v))
    return {k: tuple(float(x) for x in np.percentile(v, [2.5, 97.5])) for k, v in values.items()}


def pooled_by_recipe(runs: list[dict[str, Any]]):
    """(recipe, seed, that recipe and seed's fold runs, their pooled out-of-fold rows) in run order."""
    for (recipe, seed), group in pd.DataFrame(runs).groupby(["recipe", "seed"], sort=False):
        yield recipe, seed, group.to_dict("records"), pd.DataFrame([p for r in group["oof"] for p in r])


@dataclass(frozen=True)
class CrossValidation:
    """A patient-level k-fold cross-validation of one data set: each recipe x seed x fold one `dvc exp
    run` with `split.test_fold` K, each run's test predictions kept (`oof_rows(ws)`), and
    results/<name>.md written from the pooled out-of-fold rows (`table(runs)`)."""

    name: str
    title: str
    source: str  # under ../shared/datasets
    importer: Callable[[Path], Callable[[Path], None]]  # the source -> what fills the project's data/raw
    params: dict[str, Any]  # the project's params.yaml, over the defaults
    recipes: dict[str, dict[str, Any]]
    folds: int
    oof_rows: Callable[[Path], list[dict[str, Any]]]
    table: Callable[[list[dict[str, Any]]], list[str]]
    notes: str

    def main(self, argv: list[str] | None = None) -> int:
        args = recipe_args(self.title, self.recipes, argv, seeds=[0])
        src = dataset(self.source)
        if src is None:
            return 0
        if not args.table_only:
            ws = make_project(self.name, self.importer(src), self.params)
            run_recipes(
                ws, self.name, self.recipes, args.recipe, args.seeds, self.folds, lambda ws: {"oof": self.oof_rows(ws)}
            )
        runs = recorded(self.name)
        if runs:
            write_cv_results(self.name, self.title, runs, self.table(runs), self.notes)
        return 0


def write_cv_results(name: str, title: str, runs: list[dict[str, Any]], table: list[str], notes: str) -> Path:
    """bench/quality/results/<name>.md for a cross-validation: title, machine, table, notes."""
    lines = [
        f"# {title}",
        "",
        f"Runs recorded by `dvc exp run` in bench/quality/.work/{name}; machine: "
        f"{'; '.join(sorted({r['machine'] for r in runs}))}.",
        "",
        *table,
        "",
        notes,
        "",
    ]
    path = RESULTS / f"{name}.md"
    common.write_text(path, "\n".join(lines))
    print("\n".join(lines))
    return path
