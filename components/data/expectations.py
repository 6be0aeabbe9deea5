"""The validate suite: each check as a Great Expectations 1.x expectation on one table, and the run
of them through an in-memory GX context.

    checks = expectations.build_checks(params)               # the Check list, named and described
    results = expectations.run_gx(tables, checks)            # {check name: GX result, JSON-safe}

The tables are the manifest and the tables derived from it (components.data.validation_tables);
components.data.validate turns the results into the report.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from components.common import SPLITS
from components.data import folders
from components.data.validation_tables import NUMERIC_COLUMNS
from components.params import Params

SUITE = "medtune_manifest"
GX_LIST_CAP = 100  # full GX lists are capped in validation.json so a bad manifest cannot bloat it


@dataclass(frozen=True)
class Check:
    name: str
    table: str
    critical: bool
    description: str
    expectation: Callable[[Any], Any]  # gxe module -> Expectation (built lazily: GX imports slowly)
    noun: str = "file(s)"  # what one offending entry is, for the failure message


def build_checks(p: Params) -> list[Check]:
    """Every check of the suite, in report order: the files, the readable rows, the splits."""
    return [*_file_checks(p), *_row_checks(p), *_split_checks(p)]


def _file_checks(p: Params) -> list[Check]:
    v = p.validate
    return [
        Check(
            "path_present",
            "files",
            True,
            "every row has a path",
            lambda x: x.ExpectColumnValuesToNotBeNull(column="path"),
        ),
        Check(
            "sha256_present",
            "files",
            True,
            "every row has a sha256",
            lambda x: x.ExpectColumnValuesToNotBeNull(column="sha256"),
        ),
        # Duplicates are listed always, but stop the pipeline only where they do harm: across splits
        # (test images seen in training; ingest keeps duplicates together, so only an explicit split
        # column can do this) or with different labels.
        Check(
            "sha256_unique",
            "files",
            False,
            "no duplicate images (listed; harmless within one split)",
            lambda x: x.ExpectColumnValuesToBeUnique(column="sha256"),
            "hash(es) shared by several files",
        ),
        Check(
            "duplicates_in_one_split",
            "hash_splits",
            True,
            f"no image in two splits (validate.max_duplicates={v.max_duplicates} group(s) tolerated)",
            lambda x: x.ExpectColumnValuesToBeUnique(column="sha256"),
            "hash(es) in several splits",
        ),
        Check(
            "duplicates_agree_on_label",
            "hash_labels",
            True,
            f"byte-identical images carry the same {'target' if p.data.regression else 'label'} "
            f"(validate.max_label_conflicts={v.max_label_conflicts} group(s) tolerated)",
            lambda x: x.ExpectColumnValuesToBeUnique(column="sha256"),
            "hash(es) with several labels",
        ),
        Check(
            "unreadable_within_limit",
            "unreadable",
            True,
            f"at most validate.max_unreadable={v.max_unreadable} unreadable files",
            lambda x: x.ExpectTableRowCountToBeBetween(min_value=0, max_value=v.max_unreadable),
            "unreadable file(s)",
        ),
    ]


def _row_checks(p: Params) -> list[Check]:
    v = p.validate
    size = f"[{v.min_size}, {v.max_size}] px"
    return [
        Check(
            "label_present",
            "readable",
            True,
            "every readable image has a label",
            lambda x: x.ExpectColumnValuesToNotBeNull(column="label"),
        ),
        _label_check(p),
        Check(
            "split_present",
            "readable",
            True,
            "every readable image has a split",
            lambda x: x.ExpectColumnValuesToNotBeNull(column="split"),
        ),
        Check(
            "split_in_set",
            "readable",
            True,
            f"split in {list(SPLITS)}",
            lambda x: x.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        ),
        # A patient-less row cannot be checked for leakage; ingest always sets one, so only warn.
        Check(
            "patient_present",
            "readable",
            False,
            "every readable image has a (hashed) patient",
            lambda x: x.ExpectColumnValuesToNotBeNull(column="patient"),
        ),
        *[
            Check(
                f"{col}_present",
                "readable",
                True,
                f"every readable image has a numeric {col}",
                lambda x, col=col: x.ExpectColumnValuesToNotBeNull(column=col),
            )
            for col in NUMERIC_COLUMNS
        ],
        Check(
            "width_in_range",
            "readable",
            True,
            f"width in {size}",
            lambda x: x.ExpectColumnValuesToBeBetween(column="width", min_value=v.min_size, max_value=v.max_size),
        ),
        Check(
            "height_in_range",
            "readable",
            True,
            f"height in {size}",
            lambda x: x.ExpectColumnValuesToBeBetween(column="height", min_value=v.min_size, max_value=v.max_size),
        ),
        Check(
            "bit_depth_allowed",
            "readable",
            True,
            f"bit depth in validate.bit_depths {list(v.bit_depths)}",
            lambda x: x.ExpectColumnValuesToBeInSet(column="bit_depth", value_set=list(v.bit_depths)),
        ),
    ]


def _label_check(p: Params) -> Check:
    """The label is a class of data.classes; in regression, a finite number (validation_tables' `target`)."""
    if p.data.regression:
        return Check(
            "label_is_number",
            "readable",
            True,
            "labels are finite numbers (data.task regression: the target)",
            lambda x: x.ExpectColumnValuesToNotBeNull(column="target"),
        )
    classes = list(p.data.classes)
    return Check(
        "label_in_classes",
        "readable",
        True,
        f"labels in data.classes {classes}",
        lambda x: x.ExpectColumnValuesToBeInSet(column="label", value_set=classes),
    )


def _split_checks(p: Params) -> list[Check]:
    v = p.validate
    what = "target-bin" if p.data.regression else "class"
    return [
        Check(
            "patient_in_one_split",
            "patient_splits",
            True,
            "no patient in two splits",
            lambda x: x.ExpectColumnValuesToBeUnique(column="patient"),
            "patient(s) in several splits",
        ),
        # Ingest keeps near-duplicates in one split, so only a given split column can do this.
        Check(
            "near_duplicates_in_one_split",
            "similar_splits",
            True,
            "no near-duplicate images in two splits "
            f"(validate.max_near_duplicates={v.max_near_duplicates} group(s) tolerated)",
            lambda x: x.ExpectColumnValuesToBeUnique(column="similar_group"),
            "group(s) of near-duplicate images (named by their first file) in several splits",
        ),
        # components.data.folders lists what ingest did not take; a link out of the raw folder is refused.
        Check(
            "links_stay_inside",
            "skipped",
            True,
            "no symbolic link from the raw folder to outside it",
            lambda x: x.ExpectColumnValuesToNotBeInSet(column="reason", value_set=[folders.LINK_OUTSIDE]),
            "link(s) to outside the raw folder (never opened): remove them, or copy the files in",
        ),
        Check(
            "nothing_skipped",
            "skipped_visible",
            False,
            "every visible file under the raw folder is a scan",
            lambda x: x.ExpectTableRowCountToEqual(value=0),
            "file(s) skipped",
        ),
        Check(
            "split_balance_close",
            "split_balance",
            False,
            f"split and {what} shares within validate.warn_split_deviation={v.warn_split_deviation} of the "
            "configured ones",
            lambda x: x.ExpectColumnValuesToBeBetween(column="deviation", max_value=v.warn_split_deviation),
            "share(s) off",
        ),
        Check(
            "split_balance_within_limit",
            "split_balance",
            True,
            f"split and {what} shares within validate.max_split_deviation={v.max_split_deviation} of the "
            "configured ones",
            lambda x: x.ExpectColumnValuesToBeBetween(column="deviation", max_value=v.max_split_deviation),
            "share(s) far off",
        ),
        _count_check(p),
    ]


def _count_check(p: Params) -> Check:
    """Enough images per (split, class); in regression, per split."""
    least = p.validate.min_images_per_class_split
    name, per, noun = (
        ("images_per_split", "split", "split(s) short of images")
        if p.data.regression
        else ("images_per_class_split", "(split, class)", "(split, class) pair(s) short of images")
    )
    return Check(
        name,
        "class_split_counts",
        True,
        f"at least validate.min_images_per_class_split={least} images per {per}",
        lambda x: x.ExpectColumnValuesToBeBetween(column="n", min_value=least),
        noun,
    )


# Columns GX reports beside each unexpected value, so a failure names the file (or the group).
INDEX_COLUMNS = {
    "files": ["path"],
    "readable": ["path"],
    "unreadable": ["path"],
    "hash_splits": ["sha256"],
    "hash_labels": ["sha256"],
    "patient_splits": ["split"],
    "similar_splits": ["split"],
    "class_split_counts": ["split", "label"],
    "skipped": ["path"],
    "skipped_visible": ["path"],
    "split_balance": ["share", "realised", "expected"],
}


def _quiet_gx() -> None:
    logging.getLogger("great_expectations").setLevel(logging.ERROR)


def run_gx(tables: dict[str, pd.DataFrame], checks: list[Check]) -> dict[str, dict]:
    """Run one GX validation per table; return the serialised GX result of each check by name."""
    _quiet_gx()  # before the import: GX logs hundreds of INFO lines while importing
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
    )
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
        result = vd.run(
            batch_parameters={"dataframe": frame},
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": INDEX_COLUMNS[table]},
        )
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
        d["exception_info"] = {
            "raised_exception": True,
            "exception_message": info.get("exception_message") or "; ".join(messages),
        }
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
