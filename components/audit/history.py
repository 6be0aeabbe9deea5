"""The audit trail: find any model's lineage, read the registry, list every model, roll back.

    medtune models list                       # every model produced or promoted; the current one marked
    medtune models list --json
    medtune models rollback 3f2a9c1e0b7d --reason "new model misses small lesions"

`medtune trace MODEL` (components/audit/trace.py) and `medtune verify MODEL` (components/audit/verify.py) build
on the look-ups here. MODEL is an ONNX file, a model directory holding `lineage.json` (`models/`,
`registry/models/<id>/`), a model id from the registry (or a unique prefix of >= 4 characters),
or `current`. The registry layout is the one in docs/architecture.md; everything here reads plain
files (JSON, CSV, YAML, `git show`) and never imports torch, so it stays fast.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.audit.lookup import add_common_args
from components.common import run_cli
from components.release import registry
from components.release.records import (
    LINEAGE,
    NOT_RECORDED,
    events_for,
    key_metrics,
    load_lineage,
    not_recorded,
    read_current,
    read_releases,
    registered_ids,
    registry_dir,
)
from components.templates import format_table


def list_models(root: str | Path = ".") -> list[dict[str, Any]]:
    """Every model the registry knows (registered, or named by a release event) plus the
    workspace's exported model: id, date, data version, key metrics, gate, status, current."""
    root = Path(root)
    registry = registry_dir(root)
    events = read_releases(registry)
    current = (read_current(registry) or {}).get("model_id")
    order: list[str] = []
    for mid in [e.get("model_id") for e in events] + registered_ids(registry):
        if mid and mid != "none" and mid not in order:
            order.append(mid)
    ws_lineage = None
    if (root / "models" / LINEAGE).is_file():
        ws_lineage = load_lineage(root / "models" / LINEAGE)
        if ws_lineage["model_id"] not in order:
            order.append(str(ws_lineage["model_id"]))
    rows = []
    for mid in order:
        lineage_path = registry / "models" / mid / LINEAGE
        lineage = (
            load_lineage(lineage_path)
            if lineage_path.is_file()
            else (ws_lineage if ws_lineage and ws_lineage["model_id"] == mid else None)
        )
        mine = events_for(events, mid)
        kinds = [e.get("event") for e in mine]
        status = (
            "promoted"
            if "promoted" in kinds
            else "rejected"
            if "rejected" in kinds
            else "rolled back to"
            if "rollback" in kinds
            else "not released"
        )
        first = next((e for e in mine if e.get("event") == "promoted"), mine[0] if mine else {})
        as_challenger = (first.get("challenger") or {}).get("metrics") if first else None
        rows.append(
            {
                "model_id": mid,
                "date": first.get("time") or not_recorded("no release event"),
                "data_version": ((lineage or {}).get("data") or {}).get("data_version")
                or first.get("data_version")
                or not_recorded("no lineage"),
                "metrics": key_metrics(lineage, as_challenger),
                "gate": (
                    (
                        ((lineage or {}).get("evaluation") or {}).get("gate")
                        or ((first.get("challenger") or {}).get("gate") if first else None)
                        or {}
                    ).get("passed")
                ),
                "status": status,
                "events": kinds,
                "git_tag": next((e.get("git_tag") for e in reversed(mine) if e.get("git_tag")), None),
                "current": mid == current,
                "lineage": str(lineage_path if lineage_path.is_file() else root / "models" / LINEAGE)
                if lineage
                else None,
            }
        )
    return rows


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else "-" if v is None else str(v)


COLUMNS = ("  model_id", "date", "data_version", "auroc [95% CI]", "sens", "spec", "gate", "status")


def render_models(rows: list[dict[str, Any]]) -> str:
    """`medtune models list`: one line per model, the current one marked with `*`."""
    if not rows:
        return "no models yet: run `dvc repro` (or the retraining flow) to produce one."
    table = []
    for r in rows:
        m = r["metrics"]
        # A regression shows its MAE (with "mae") in the headline column and R^2 in place of sensitivity.
        regression = "mae" in m and "auroc" not in m
        name, label = ("mae", "mae ") if regression else ("auroc", "")
        ci = m.get(f"{name}_ci") or [None, None]
        headline = f"{label}{_fmt(m[name])} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if name in m else "-"
        second = f"r2 {_fmt(m['r2'])}" if regression and "r2" in m else _fmt(m.get("sensitivity"))
        date = r["date"] if not str(r["date"]).startswith(NOT_RECORDED) else "-"
        dv = str(r["data_version"])
        dv = "-" if dv.startswith(NOT_RECORDED) else dv[:14]
        gate = {True: "passed", False: "failed"}.get(r["gate"], "-")
        status = r["status"] + (f" ({r['git_tag']})" if r["git_tag"] else "")
        table.append(
            (
                f"{'*' if r['current'] else ' '} {r['model_id']}",
                date,
                dv,
                headline,
                second,
                _fmt(m.get("specificity")),
                gate,
                status,
            )
        )
    return format_table(table, COLUMNS, align="<<<<>><<") + "\n* = current (registry/current.json)"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="medtune models",
        description="Every model produced and promoted; "
        "roll back to an earlier promoted model (recorded in registry/releases.jsonl).",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    add_common_args(sub.add_parser("list", help="every model: id, date, data version, key metrics, gate, current"))
    rb = sub.add_parser("rollback", help="make an earlier promoted model current again, and record it")
    rb.add_argument("model_id", help="id (or unique prefix) of a model promoted before")
    rb.add_argument("--reason", default=None, help="why (stored in the rollback event)")
    rb.add_argument("--no-commit", action="store_true", help="write the registry files but do not git commit them")
    add_common_args(rb)

    def run(args: argparse.Namespace) -> int:
        if args.action == "list":
            rows = list_models(args.root)
            print(json.dumps(rows, indent=2) if args.json else render_models(rows))
            return 0
        event = registry.rollback(args.model_id, args.root, args.reason, commit=not args.no_commit)
        if args.json:
            print(json.dumps(event, indent=2, sort_keys=True))
        else:
            print(
                f"rolled back: current model is now {event['model_id']} (was {event['champion']['model_id']}); "
                f"recorded in {registry_dir(args.root) / 'releases.jsonl'}"
                + (f", commit {event['git_commit'][:12]}" if event.get("git_commit") else "")
            )
        return 0

    return run_cli(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
