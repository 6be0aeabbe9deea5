"""Stage 2: a Great Expectations suite over the manifest; stop the pipeline on bad data.

    medtune validate        # data/manifest.{csv,json} -> reports/validation.{json,md}

Checks, each a GX 1.x expectation (severity "critical" stops the pipeline):
labels known and present, paths and hashes present, no byte-identical image in two splits (or
with two labels; duplicates within one split are listed as a warning), no patient in two splits, image size and bit depth in range, enough images per
(split, class), unreadable files within `validate.max_unreadable`, valid split names.

Tables that are not the manifest itself (patient -> split pairs, counts per split and class,
unreadable files) are derived here with pandas and validated by GX like any other batch, so every
verdict in the report is a GX result. `run_suite(df, params)` does the work without writing files.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.common import SPLITS, StageError, read_json, stage_main, write_json, write_text
from components.data import folders
from components.data.manifest import read_manifest
from components.params import Params, load_params
from components.templates import render

SUITE = "medtune_manifest"
COLUMNS = ("path", "sha256", "label", "patient", "width", "height", "bit_depth", "split", "error")
TEXT_COLUMNS = ("path", "sha256", "label", "patient", "split", "error", "modality", "similar_group")
NUMERIC_COLUMNS = ("width", "height", "bit_depth")
SHOWN = 10  # offending values shown per failure in messages and the markdown summary
GX_LIST_CAP = 100  # full GX lists are capped in validation.json so a bad manifest cannot bloat it

log = logging.getLogger("medtune.validate")


@dataclass(frozen=True)
class Check:
    name: str
    table: str
    critical: bool
    description: str
    expectation: Callable[[Any], Any]  # gxe module -> Expectation (built lazily: GX imports slowly)
    noun: str = "file(s)"  # what one offending entry is, for the failure message


def _checks(p: Params) -> list[Check]:
    v, classes = p.validate, list(p.data.classes)
    size = f"[{v.min_size}, {v.max_size}] px"
    return [
        Check("path_present", "files", True, "every row has a path",
              lambda x: x.ExpectColumnValuesToNotBeNull(column="path")),
        Check("sha256_present", "files", True, "every row has a sha256",
              lambda x: x.ExpectColumnValuesToNotBeNull(column="sha256")),
        # Duplicates are listed always, but stop the pipeline only where they do harm: across splits
        # (test images seen in training; ingest keeps duplicates together, so only an explicit split
        # column can do this) or with different labels.
        Check("sha256_unique", "files", False, "no duplicate images (listed; harmless within one split)",
              lambda x: x.ExpectColumnValuesToBeUnique(column="sha256"), "hash(es) shared by several files"),
        Check("duplicates_in_one_split", "hash_splits", True, "no image in two splits "
              f"(validate.max_duplicates={v.max_duplicates} group(s) tolerated)",
              lambda x: x.ExpectColumnValuesToBeUnique(column="sha256"), "hash(es) in several splits"),
        Check("duplicates_agree_on_label", "hash_labels", True, "byte-identical images carry the same label "
              f"(validate.max_label_conflicts={v.max_label_conflicts} group(s) tolerated)",
              lambda x: x.ExpectColumnValuesToBeUnique(column="sha256"), "hash(es) with several labels"),
        Check("unreadable_within_limit", "unreadable", True,
              f"at most validate.max_unreadable={v.max_unreadable} unreadable files",
              lambda x: x.ExpectTableRowCountToBeBetween(min_value=0, max_value=v.max_unreadable),
              "unreadable file(s)"),
        Check("label_present", "readable", True, "every readable image has a label",
              lambda x: x.ExpectColumnValuesToNotBeNull(column="label")),
        Check("label_in_classes", "readable", True, f"labels in data.classes {classes}",
              lambda x: x.ExpectColumnValuesToBeInSet(column="label", value_set=classes)),
        Check("split_present", "readable", True, "every readable image has a split",
              lambda x: x.ExpectColumnValuesToNotBeNull(column="split")),
        Check("split_in_set", "readable", True, f"split in {list(SPLITS)}",
              lambda x: x.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS))),
        # A patient-less row cannot be checked for leakage; ingest always sets one, so only warn.
        Check("patient_present", "readable", False, "every readable image has a (hashed) patient",
              lambda x: x.ExpectColumnValuesToNotBeNull(column="patient")),
        *[Check(f"{col}_present", "readable", True, f"every readable image has a numeric {col}",
                lambda x, col=col: x.ExpectColumnValuesToNotBeNull(column=col)) for col in NUMERIC_COLUMNS],
        Check("width_in_range", "readable", True, f"width in {size}",
              lambda x: x.ExpectColumnValuesToBeBetween(column="width", min_value=v.min_size, max_value=v.max_size)),
        Check("height_in_range", "readable", True, f"height in {size}",
              lambda x: x.ExpectColumnValuesToBeBetween(column="height", min_value=v.min_size, max_value=v.max_size)),
        Check("bit_depth_allowed", "readable", True, f"bit depth in validate.bit_depths {list(v.bit_depths)}",
              lambda x: x.ExpectColumnValuesToBeInSet(column="bit_depth", value_set=list(v.bit_depths))),
        Check("patient_in_one_split", "patient_splits", True, "no patient in two splits",
              lambda x: x.ExpectColumnValuesToBeUnique(column="patient"), "patient(s) in several splits"),
        # Ingest keeps near-duplicates in one split, so only a given split column can do this.
        Check("near_duplicates_in_one_split", "similar_splits", True, "no near-duplicate images in two splits "
              f"(validate.max_near_duplicates={v.max_near_duplicates} group(s) tolerated)",
              lambda x: x.ExpectColumnValuesToBeUnique(column="similar_group"),
              "group(s) of near-duplicate images (named by their first file) in several splits"),
        # components.data.folders lists what ingest did not take; a link out of the raw folder is refused.
        Check("links_stay_inside", "skipped", True, "no symbolic link from the raw folder to outside it",
              lambda x: x.ExpectColumnValuesToNotBeInSet(column="reason", value_set=[folders.LINK_OUTSIDE]),
              "link(s) to outside the raw folder (never opened): remove them, or copy the files in"),
        Check("nothing_skipped", "skipped_visible", False, "every visible file under the raw folder is a scan",
              lambda x: x.ExpectTableRowCountToEqual(value=0), "file(s) skipped"),
        Check("split_balance_close", "split_balance", False,
              f"split and class shares within validate.warn_split_deviation={v.warn_split_deviation} of the "
              "configured ones", lambda x: x.ExpectColumnValuesToBeBetween(column="deviation",
                                                                            max_value=v.warn_split_deviation),
              "share(s) off"),
        Check("split_balance_within_limit", "split_balance", True,
              f"split and class shares within validate.max_split_deviation={v.max_split_deviation} of the "
              "configured ones", lambda x: x.ExpectColumnValuesToBeBetween(column="deviation",
                                                                            max_value=v.max_split_deviation),
              "share(s) far off"),
        Check("images_per_class_split", "class_split_counts", True,
              f"at least validate.min_images_per_class_split={v.min_images_per_class_split} images "
              "per (split, class)",
              lambda x: x.ExpectColumnValuesToBeBetween(column="n", min_value=v.min_images_per_class_split),
              "(split, class) pair(s) short of images"),
    ]


# Columns GX reports beside each unexpected value, so a failure names the file (or the group).
INDEX_COLUMNS = {"files": ["path"], "readable": ["path"], "unreadable": ["path"],
                 "hash_splits": ["sha256"], "hash_labels": ["sha256"],
                 "patient_splits": ["split"], "similar_splits": ["split"], "class_split_counts": ["split", "label"],
                 "skipped": ["path"], "skipped_visible": ["path"], "split_balance": ["share", "realised", "expected"]}


def _normalise(df: pd.DataFrame, source: str) -> pd.DataFrame:
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise StageError(f"{source}: missing column(s) {missing}; expected at least {list(COLUMNS)} "
                         "(rerun `medtune ingest`).")
    df = df.copy()
    for col in TEXT_COLUMNS:
        if col in df.columns:
            df[col] = _text_or_none(df[col])
    if "similar_group" not in df.columns:  # a manifest from before near-duplicates were found
        df["similar_group"] = None
    for col in NUMERIC_COLUMNS:
        # Non-numbers become missing and fail the *_present checks instead of crashing GX.
        s = pd.to_numeric(df[col], errors="coerce")
        if s.dropna().mod(1).eq(0).all():
            s = s.astype("Int64")
        df[col] = s
    return df.reset_index(drop=True)


def _text_or_none(column: pd.Series) -> pd.Series:
    """Each value as text, None where missing, empty or blank: that means "no value", whichever way the
    frame was built; other values are kept exactly (a label "normal " must still fail, not be fixed
    here). numpy's string functions, not a Python call per row."""
    values = column.to_numpy(dtype=object)
    missing = pd.isna(values)
    text = np.where(missing, "", values).astype(str)
    # A string column's values are kept as they are (no new objects); any other is made text.
    out = values.copy() if isinstance(column.dtype, pd.StringDtype) else text.astype(object)
    out[missing | (np.strings.str_len(np.strings.strip(text)) == 0)] = None
    return pd.Series(out, index=column.index, dtype=object)


def _split_balance(readable: pd.DataFrame, split: dict[str, Any] | None) -> pd.DataFrame:
    """One row per share the split should keep: each split's share of the images (only where ingest
    made the split: a given one is what it is), and each class's share within each split against
    its share of all images. `deviation` is |realised - expected|."""
    rows = []
    n = len(readable)
    if n and split and split.get("source") != "labels.csv":
        test, val = float(split.get("test_fraction", 0)), float(split.get("val_fraction", 0))
        for name, expected in (("train", 1 - test - val), ("val", val), ("test", test)):
            rows.append((f"images in {name}", (readable["split"] == name).sum() / n, expected))
    overall = readable["label"].value_counts(normalize=True)
    for name, part in readable.groupby("split"):
        share = part["label"].value_counts(normalize=True)
        rows += [(f"class {label!r} in {name}", share.get(label, 0.0), overall[label]) for label in overall.index]
    table = pd.DataFrame(rows, columns=["share", "realised", "expected"]).astype({"realised": float, "expected": float})
    table["deviation"] = (table["realised"] - table["expected"]).abs().round(4)
    return table


def _skipped(meta: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(meta.get("skipped") or [], columns=["path", "reason"], dtype=object)


def _tables(df: pd.DataFrame, classes: list[str], meta: dict[str, Any]) -> dict[str, pd.DataFrame]:
    readable = df[df["error"].isna()]
    pairs, similar = ((readable.dropna(subset=[col, "split"])[[col, "split"]]
                       .drop_duplicates().sort_values([col, "split"]).reset_index(drop=True))
                      for col in ("patient", "similar_group"))
    # Every (split, class) appears, with 0 when absent, so a missing split or class fails too.
    grid = pd.MultiIndex.from_product([SPLITS, classes], names=["split", "label"])
    counts = (readable.groupby(["split", "label"]).size().reindex(grid, fill_value=0)
              .rename("n").reset_index())
    counts["n"] = counts["n"].astype("int64")
    unreadable = df[df["error"].notna()][["path", "error"]]
    hash_splits, hash_labels = (readable.dropna(subset=["sha256", col])[["sha256", col]].drop_duplicates()
                                .sort_values(["sha256", col]).reset_index(drop=True) for col in ("split", "label"))
    skipped = _skipped(meta)
    return {"files": df, "unreadable": unreadable, "readable": readable, "skipped": skipped,
            "skipped_visible": skipped[skipped["reason"] != folders.HIDDEN].reset_index(drop=True),
            "split_balance": _split_balance(readable.dropna(subset=["split", "label"]), meta.get("split")),
            "hash_splits": hash_splits, "hash_labels": hash_labels,
            "patient_splits": pairs, "similar_splits": similar, "class_split_counts": counts}


def _quiet_gx() -> None:
    logging.getLogger("great_expectations").setLevel(logging.ERROR)


def _run_gx(tables: dict[str, pd.DataFrame], checks: list[Check]) -> dict[str, dict]:
    """Run one GX validation per table; return the serialised GX result of each check by name."""
    _quiet_gx()  # before the import: GX logs hundreds of INFO lines while importing
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
                               progress_bars=ProgressBarsConfig(globally=False), analytics_enabled=False)
    ctx = gx.get_context(project_config=config, mode="ephemeral")
    source = ctx.data_sources.add_pandas("medtune")
    out: dict[str, dict] = {}
    for table, frame in tables.items():
        mine = [c for c in checks if c.table == table]
        if not mine:
            continue
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"{SUITE}.{table}"))
        for c in mine:
            exp = c.expectation(gxe)
            exp.meta = {"name": c.name, "critical": c.critical}
            exp.severity = "critical" if c.critical else "warning"
            suite.add_expectation(exp)
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{SUITE}.{table}", data=batch, suite=suite))
        result = vd.run(batch_parameters={"dataframe": frame},
                        result_format={"result_format": "COMPLETE",
                                       "unexpected_index_column_names": INDEX_COLUMNS[table]})
        for r in result.results:
            out[r.expectation_config.meta["name"]] = _clean_gx(r.to_json_dict())
    return out


def _clean_gx(d: dict) -> dict:
    """JSON-safe, deterministic copy of one GX result: no random ids, tracebacks or huge lists."""
    d = _json_safe(d)
    d.get("expectation_config", {}).pop("id", None)
    info = d.get("exception_info") or {}
    # On errors GX keys exception_info by metric id, each with a traceback; keep just the messages.
    messages = sorted({str(v.get("exception_message")) for v in info.values() if isinstance(v, dict)})
    if info.get("raised_exception") or messages:
        d["exception_info"] = {"raised_exception": True,
                               "exception_message": info.get("exception_message") or "; ".join(messages)}
    else:
        d["exception_info"] = {"raised_exception": False, "exception_message": None}
    res = d.get("result") or {}
    for key, value in list(res.items()):
        if isinstance(value, list) and len(value) > GX_LIST_CAP:
            res[key] = value[:GX_LIST_CAP]
            res[f"{key}_truncated_from"] = len(value)
        elif isinstance(value, str) and len(value) > 1000:
            res[key] = value[:1000] + "..."
    return d


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if hasattr(obj, "item"):  # numpy scalar
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (int, float)):
        return obj
    return None if pd.isna(obj) else str(obj)


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
        return [f"sha256 {h[:12]}... is " + "; ".join(f"{r.path} ({key} {getattr(r, key)})"
                                                     for r in readable[readable["sha256"] == h].itertuples())
                for h in dict.fromkeys(r["sha256"] for r in rows)]
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
    df = _normalise(df, source)
    meta = meta or {}
    tables = _tables(df, classes, meta)
    checks = _checks(params)
    gx_results = _run_gx(tables, checks)

    tolerated = {"duplicates_in_one_split": params.validate.max_duplicates,
                 "duplicates_agree_on_label": params.validate.max_label_conflicts,
                 "near_duplicates_in_one_split": params.validate.max_near_duplicates}
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
        entry = {"name": c.name, "description": c.description, "table": c.table, "critical": critical,
                 "success": bool(res.get("success")), "details": details, "gx": res}
        expectations.append(entry)
        if not entry["success"]:
            failures.append({"name": c.name, "critical": critical,
                             "message": _failure_message(c, details, offending)})

    readable = tables["readable"]
    counts = {s: {k: int(n) for k, n in g.set_index("label")["n"].items()}
              for s, g in tables["class_split_counts"].groupby("split", sort=False)}
    return {
        "suite": SUITE,
        "success": not any(f["critical"] for f in failures),
        "n_rows": len(df), "n_readable": len(readable), "n_unreadable": len(tables["unreadable"]),
        "n_patients": int(readable["patient"].nunique()),
        "counts": counts,
        "unreadable": [{"path": r.path, "error": r.error} for r in tables["unreadable"].itertuples()],
        "skipped": tables["skipped"].to_dict("records"),
        "expectations": expectations,
        "failures": failures,
    }


def _failure_message(c: Check, details: dict, offending: list[str]) -> str:
    if "exception" in details:
        return f"{c.name} ({c.description}): GX could not evaluate it: {details['exception']}"
    return f"{c.name} (expected {c.description}): {len(offending)} {c.noun}: " + "; ".join(_truncate(offending))


SKIPPED_SHOWN = 200  # skipped entries listed in validation.md (validation.json has them all)


def render_markdown(report: dict) -> str:
    """reports/validation.md: the report laid out by data/templates/validation.md.j2."""
    checks = [{"name": e["name"], "description": e["description"], "critical": e["critical"],
               "result": "PASS" if e["success"] else ("FAIL" if e["critical"] else "WARN"),
               "unexpected": e["details"].get("unexpected_count", e["details"].get("observed_value", ""))}
              for e in report["expectations"]]
    by_name = {e["name"]: e for e in report["expectations"]}
    failures = [{"name": f["name"], "critical": f["critical"], "description": by_name[f["name"]]["description"],
                 "exception": by_name[f["name"]]["details"].get("exception"),
                 "offending": by_name[f["name"]]["details"]["offending"]} for f in report["failures"]]
    text = render("data/templates/validation.md.j2", report=report, manifest=report.get("manifest"),
                  checks=checks, classes=list(next(iter(report["counts"].values()), {}).keys()),
                  counts=report["counts"], unreadable=report["unreadable"], skipped=report.get("skipped") or [],
                  skipped_shown=SKIPPED_SHOWN, failures=failures)
    return text.rstrip() + "\n"


def validate(manifest_csv: Path, manifest_json: Path, out_json: Path, out_md: Path, params: Params) -> dict:
    """Run the suite on the manifest, write both reports, raise StageError on a critical failure."""
    manifest_csv, out_json, out_md = Path(manifest_csv), Path(out_json), Path(out_md)
    df = read_manifest(manifest_csv)
    meta = read_json(manifest_json)
    if "n_images" in meta and int(meta["n_images"]) != len(df):
        raise StageError(f"{manifest_json} says n_images={meta['n_images']} but {manifest_csv} has {len(df)} "
                         "rows; the two come from different ingest runs: rerun `medtune ingest`.")
    report = run_suite(df, params, source=str(manifest_csv), meta=meta)
    report["manifest"] = {"path": manifest_csv.as_posix(), "data_version": meta.get("data_version"),
                          "content_hash": meta.get("content_hash")}
    write_json(out_json, report)
    write_text(out_md, render_markdown(report))
    critical = [f for f in report["failures"] if f["critical"]]
    for f in report["failures"]:
        if not f["critical"]:
            log.warning("validation warning: %s", f["message"])
    if critical:
        raise StageError(f"{manifest_csv}: {len(critical)} critical validation check(s) failed:\n"
                         + "\n".join(f"  - {f['message']}" for f in critical)
                         + f"\nSee {out_md} for the full report.")
    log.info("validation passed: %d checks on %d files -> %s", len(report["expectations"]), len(df), out_json)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--manifest", default="data/manifest.csv", help="manifest CSV written by ingest")
        p.add_argument("--manifest-json", default="data/manifest.json", help="manifest summary written by ingest")
        p.add_argument("--out-json", default="reports/validation.json", help="full GX result (JSON)")
        p.add_argument("--out-md", default="reports/validation.md", help="human summary (Markdown)")

    def run(args: argparse.Namespace) -> None:
        validate(Path(args.manifest), Path(args.manifest_json), Path(args.out_json), Path(args.out_md),
                 load_params(args.params))

    return stage_main("Validate the manifest with a Great Expectations suite.", add_args, run, argv)
