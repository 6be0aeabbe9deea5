"""One MedMNIST .npz data set through the pipeline: import (official split kept), then each recipe
for each seed as a `dvc exp run`, then the results table. pneumoniamnist.py / breastmnist.py call
`main` with their data set's facts."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from bench.quality import harness


@dataclass
class Dataset:
    name: str
    npz: str  # relative to ../shared/datasets
    classes: list[str]  # label index order
    positive: str
    title: str
    published: list[tuple[str, str, str]]
    recipes: dict[str, dict[str, Any]]  # label -> {"preset": name or None, "sets": {dotted: value}}
    params: dict[str, Any] = field(default_factory=dict)  # data-set facts, committed to the project's params.yaml
    notes: list[str] = field(default_factory=list)


def main(ds: Dataset, argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=f"{ds.title}: recipes x seeds as dvc experiments")
    ap.add_argument("--recipe", action="append", choices=list(ds.recipes),
                    help="recipe to run (repeatable; default: all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed values (default 0 1 2)")
    ap.add_argument("--table-only", action="store_true", help="rewrite the table from the recorded runs")
    args = ap.parse_args(argv)
    npz = harness.dataset(ds.npz)
    if npz is None:
        return 0
    runs = []
    if not args.table_only:
        ws = harness.make_project(ds.name, ["medtune", "import-npz", str(npz), "--out", "data/raw",
                                            "--classes", ",".join(ds.classes)],
                                  harness.merge({"data": {"label_source": "csv", "classes": ds.classes},
                                                 "evaluate": {"positive_class": ds.positive}}, ds.params))
        for label in args.recipe or list(ds.recipes):
            recipe = ds.recipes[label]
            for seed in args.seeds:
                sets = harness.recipe_sets(recipe.get("preset"), **recipe.get("sets", {}), **{"train.seed": seed})
                exp = f"{label.replace(' ', '-').replace('@', '')}-s{seed}"
                print(f"running {exp}: {sets}", flush=True)
                row = harness.exp_run(ws, exp, sets)
                m = row["metrics"]
                print(f"  AUROC {m['auroc']:.4f} ACC {m['accuracy']:.4f} in {row['seconds']:.0f} s", flush=True)
                runs = harness.record(ds.name, label, row)
    from components.common import read_json

    path = harness.RESULTS / f"{ds.name}.json"
    runs = read_json(path)["runs"] if path.is_file() else runs
    if runs:
        harness.write_table(ds.name, ds.title, runs, ds.published, ds.notes)
    return 0
