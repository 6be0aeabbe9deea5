"""Stage 2: a Great Expectations suite over the manifest; stop the pipeline on bad data.

    medtune validate        # data/manifest.{csv,json} -> reports/validation.{json,md}

Checks, each a GX 1.x expectation (severity "critical" stops the pipeline):
labels known and present, paths and hashes present, no byte-identical image in two splits (or
with two labels; duplicates within one split are listed as a warning), no patient in two splits, image size and bit depth in range, enough images per
(split, class), unreadable files within `validate.max_unreadable`, valid split names. In regression
(data.task) a label is a finite number (the target), images are counted per split, the split's
balance is checked on bins of the target, and the report adds `task` and `target_stats`.

Tables that are not the manifest itself (patient -> split pairs, counts per split and class,
unreadable files) are derived with pandas (components.data.validation_tables) and validated by GX
like any other batch (the suite: components.data.expectations), so every verdict in the report is a
GX result. This module turns the results into the report and runs the stage. `run_suite(df, params)`
does the work without writing files.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from components.common import StageError, read_json, stage_main, write_json, write_text
from components.data.expectations import SUITE, Check, build_checks, run_gx
from components.data.manifest import read_manifest, target_stats
from components.data.validation_tables import NUMERIC_COLUMNS, build_tables, normalise
from components.params import Params, load_params
from components.templates import render

SHOWN = 10  # offending values shown per failure in messages and the markdown summary

log = logging.getLogger("medtune.validate")


def _offending(c: Check, res: dict, tables: dict[str, pd.DataFrame]) -> list[str]:
    """Human-readable offending files/values of one check, from GX's unexpected rows."""
    if c.name == "unreadable_within_limit":
        # Listed even when within the limit: an unreadable file is always worth a look.
        return [f"{r.path}: {r.error}" for r in tables["unreadable"].itertuples()]
    rows = (res.get("result") or {}).get("unexpected_index_list") or []
    col = (res.get("expectation_config") or {}).get("kwargs", {}).get("column")
    if c.name == "sha256_unique":
        groups: dict[str, list[str]] = {}
        for r in rows:
            groups.setdefault(r["sha256"], []).append(r["path"])
        return [f"sha256 {h[:12]}... shared by {', '.join(ps)}" for h, ps in groups.items()]
    if c.name in ("duplicates_in_one_split", "duplicates_agree_on_label"):
        readable, key = tables["readable"], "split" if c.name == "duplicates_in_one_split" else "label"
        return [
            f"sha256 {h[:12]}... is "
            + "; ".join(f"{r.path} ({key} {getattr(r, key)})" for r in readable[readable["sha256"] == h].itertuples())
            for h in dict.fromkeys(r["sha256"] for r in rows)
        ]
    if c.name in ("patient_in_one_split", "near_duplicates_in_one_split"):
        readable, col = tables["readable"], "patient" if c.name == "patient_in_one_split" else "similar_group"
        out = []
        for key in dict.fromkeys(r[col] for r in rows):  # unique, in GX's order
            mine = readable[readable[col] == key]
            per_split = [f"{s} ({', '.join(_truncate(list(g['path']), 3))})" for s, g in mine.groupby("split")]
            name = f"patient {key}" if col == "patient" else f"near-duplicates of {key}"
            out.append(f"{name} in splits " + "; ".join(per_split))
        return out
    if c.name == "nothing_skipped":
        return [f"{r.path}: {r.reason}" for r in tables["skipped_visible"].itertuples()]
    if c.name.startswith("split_balance"):
        return [f"{r['share']}: {r['realised']:.2f}, expected {r['expected']:.2f}" for r in rows]
    if c.name == "links_stay_inside":
        return [f"{r['path']}" for r in rows]
    if c.name == "images_per_class_split":
        return [f"split {r['split']!r}, class {r['label']!r}: {r['n']} image(s)" for r in rows]
    if c.name == "images_per_split":
        return [f"split {r['split']!r}: {r['n']} image(s)" for r in rows]
    if c.name == "label_is_number":
        labels = dict(zip(tables["readable"]["path"], tables["readable"]["label"]))
        return [f"{r['path']}: label {labels.get(r['path'])!r} is not a finite number" for r in rows]
    if c.name.endswith("_present"):
        why = "missing or not a number" if col in NUMERIC_COLUMNS else "missing"
        return [f"{r['path']}: {col} {why}" for r in rows]
    return [f"{r['path']}: {col}={r.get(col)!r}" for r in rows]


def _truncate(items: list[str], n: int = SHOWN) -> list[str]:
    return items[:n] + ([f"... and {len(items) - n} more"] if len(items) > n else [])


def run_suite(df: pd.DataFrame, params: Params, source: str = "manifest", meta: dict[str, Any] | None = None) -> dict:
    """Validate a manifest-shaped DataFrame (and what manifest.json `meta` says of the split and of the
    files ingest skipped); return the report dict (nothing is written).

    `report["success"]` is False when any critical check fails; `report["failures"]` lists every
    failed check with its offending files/values. `source` names the data in error messages.
    """
    classes = list(params.data.classes)
    df = normalise(df, source)
    meta = meta or {}
    tables = build_tables(df, classes, meta, params.data.regression)
    checks = build_checks(params)
    gx_results = run_gx(tables, checks)

    tolerated = {
        "duplicates_in_one_split": params.validate.max_duplicates,
        "duplicates_agree_on_label": params.validate.max_label_conflicts,
        "near_duplicates_in_one_split": params.validate.max_near_duplicates,
    }
    expectations, failures = [], []
    for c in checks:
        res = gx_results[c.name]
        r = res.get("result") or {}
        offending = _offending(c, res, tables)
        details = {k: r[k] for k in ("element_count", "unexpected_count", "missing_count", "observed_value") if k in r}
        if res["exception_info"]["raised_exception"]:
            details["exception"] = res["exception_info"]["exception_message"]
        details["offending"], details["n_offending"] = _truncate(offending, 20), len(offending)
        critical = c.critical
        if c.name in tolerated and len(offending) <= tolerated[c.name]:
            critical = False  # tolerated by params: a listed warning, not a stop
        entry = {
            "name": c.name,
            "description": c.description,
            "table": c.table,
            "critical": critical,
            "success": bool(res.get("success")),
            "details": details,
            "gx": res,
        }
        expectations.append(entry)
        if not entry["success"]:
            failures.append({"name": c.name, "critical": critical, "message": _failure_message(c, details, offending)})

    readable = tables["readable"]
    counts = {
        s: {k: int(n) for k, n in g.set_index("label")["n"].items()}
        for s, g in tables["class_split_counts"].groupby("split", sort=False)
    }
    report = {
        "suite": SUITE,
        "success": not any(f["critical"] for f in failures),
        "n_rows": len(df),
        "n_readable": len(readable),
        "n_unreadable": len(tables["unreadable"]),
        "n_patients": int(readable["patient"].nunique()),
        "counts": counts,
        "unreadable": [{"path": r.path, "error": r.error} for r in tables["unreadable"].itertuples()],
        "skipped": tables["skipped"].to_dict("records"),
        "expectations": expectations,
        "failures": failures,
    }
    if params.data.regression:  # classification's report keeps its keys (and bytes)
        report["task"] = "regression"
        report["target_stats"] = target_stats(list(readable["label"].fillna("")), list(readable["split"].fillna("")))
    return report


def _failure_message(c: Check, details: dict, offending: list[str]) -> str:
    if "exception" in details:
        return f"{c.name} ({c.description}): GX could not evaluate it: {details['exception']}"
    return f"{c.name} (expected {c.description}): {len(offending)} {c.noun}: " + "; ".join(_truncate(offending))


SKIPPED_SHOWN = 200  # skipped entries listed in validation.md (validation.json has them all)


def render_markdown(report: dict) -> str:
    """reports/validation.md: the report laid out by data/templates/validation.md.j2."""
    checks = [
        {
            "name": e["name"],
            "description": e["description"],
            "critical": e["critical"],
            "result": "PASS" if e["success"] else ("FAIL" if e["critical"] else "WARN"),
            "unexpected": e["details"].get("unexpected_count", e["details"].get("observed_value", "")),
        }
        for e in report["expectations"]
    ]
    by_name = {e["name"]: e for e in report["expectations"]}
    failures = [
        {
            "name": f["name"],
            "critical": f["critical"],
            "description": by_name[f["name"]]["description"],
            "exception": by_name[f["name"]]["details"].get("exception"),
            "offending": by_name[f["name"]]["details"]["offending"],
        }
        for f in report["failures"]
    ]
    text = render(
        "data/templates/validation.md.j2",
        report=report,
        manifest=report.get("manifest"),
        checks=checks,
        classes=list(next(iter(report["counts"].values()), {}).keys()),
        counts=report["counts"],
        target_stats=report.get("target_stats"),
        unreadable=report["unreadable"],
        skipped=report.get("skipped") or [],
        skipped_shown=SKIPPED_SHOWN,
        failures=failures,
    )
    return text.rstrip() + "\n"


def validate(manifest_csv: Path, manifest_json: Path, out_json: Path, out_md: Path, params: Params) -> dict:
    """Run the suite on the manifest, write both reports, raise StageError on a critical failure."""
    manifest_csv, out_json, out_md = Path(manifest_csv), Path(out_json), Path(out_md)
    df = read_manifest(manifest_csv)
    meta = read_json(manifest_json)
    if "n_images" in meta and int(meta["n_images"]) != len(df):
        raise StageError(
            f"{manifest_json} says n_images={meta['n_images']} but {manifest_csv} has {len(df)} "
            "rows; the two come from different ingest runs: rerun `medtune ingest`."
        )
    report = run_suite(df, params, source=str(manifest_csv), meta=meta)
    report["manifest"] = {
        "path": manifest_csv.as_posix(),
        "data_version": meta.get("data_version"),
        "content_hash": meta.get("content_hash"),
    }
    write_json(out_json, report)
    write_text(out_md, render_markdown(report))
    critical = [f for f in report["failures"] if f["critical"]]
    for f in report["failures"]:
        if not f["critical"]:
            log.warning("validation warning: %s", f["message"])
    if critical:
        raise StageError(
            f"{manifest_csv}: {len(critical)} critical validation check(s) failed:\n"
            + "\n".join(f"  - {f['message']}" for f in critical)
            + f"\nSee {out_md} for the full report."
        )
    log.info("validation passed: %d checks on %d files -> %s", len(report["expectations"]), len(df), out_json)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--manifest", default="data/manifest.csv", help="manifest CSV written by ingest")
        p.add_argument("--manifest-json", default="data/manifest.json", help="manifest summary written by ingest")
        p.add_argument("--out-json", default="reports/validation.json", help="full GX result (JSON)")
        p.add_argument("--out-md", default="reports/validation.md", help="human summary (Markdown)")

    def run(args: argparse.Namespace) -> None:
        validate(
            Path(args.manifest),
            Path(args.manifest_json),
            Path(args.out_json),
            Path(args.out_md),
            load_params(args.params),
        )

    return stage_main("Validate the manifest with a Great Expectations suite.", add_args, run, argv)
