"""One data set with an official test split through the pipeline: import (official split kept), then each recipe
for each seed as a `dvc exp run`, then the results table. pneumoniamnist.py / breastmnist.py call
`main` with their data set's facts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.quality import harness


@dataclass
class Dataset:
    name: str
    source: str  # relative to ../shared/datasets
    classes: list[str]  # label index order
    positive: str
    title: str
    published: list[tuple[str, str, str]]
    recipes: dict[str, dict[str, Any]]  # label -> {"preset": name or None, "sets": {dotted: value}}
    params: dict[str, Any] = field(default_factory=dict)  # data-set facts, committed to the project's params.yaml
    notes: list[str] = field(default_factory=list)


def main(ds: Dataset, argv: list[str] | None = None, import_cmd: Callable[[Path], list[str]] | None = None) -> int:
    """`ds.source` is the data set's path under ../shared/datasets; `import_cmd(path)` the command that
    imports it (default: medtune import-npz)."""
    args = harness.recipe_args(f"{ds.title}: recipes x seeds as dvc experiments", ds.recipes, argv, seeds=[0, 1, 2])
    src = harness.dataset(ds.source)
    if src is None:
        return 0
    if not args.table_only:
        cmd = (
            import_cmd(src)
            if import_cmd
            else ["medtune", "import-npz", str(src), "--out", "data/raw", "--classes", ",".join(ds.classes)]
        )
        ws = harness.make_project(
            ds.name,
            cmd,
            harness.merge(
                {"data": {"label_source": "csv", "classes": ds.classes}, "evaluate": {"positive_class": ds.positive}},
                ds.params,
            ),
        )
        harness.run_recipes(ws, ds.name, ds.recipes, args.recipe, args.seeds)
    runs = harness.recorded(ds.name)
    if runs:
        harness.write_table(ds.name, ds.title, runs, ds.published, ds.notes)
    return 0
