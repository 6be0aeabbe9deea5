"""Stage 1: scan the raw folder, label every file, pseudonymise patients, split by patient.

    medtune ingest                        # data/raw -> data/manifest.csv + data/manifest.json
    medtune ingest --raw other/raw --out data

Labels come from the folder (`OUT/<class>/...`, data.label_source: folder) or from labels.csv
(path,label[,patient_id][,split], paths relative to the raw folder). In regression (data.task) it
is path,target[,...], a target must be a finite number, and the manifest's label holds it as
repr(float(target)). The patient of a file is, in order: the CSV's patient_id, the DICOM PatientID,
the group "patient" of data.patient_pattern on the file name; failing all three, every image is its
own patient (and a loud warning says so).
Only HMAC hashes of patient ids are stored or logged, never the ids themselves.

The split is patient-level (components.data.splits): by default `stable` (a patient, and every patient
sharing a byte-identical or near-duplicate image with it, keeps the split it had in the previous
data/manifest.csv as data is appended; new ones go where their class is short), or `stratified`
(StratifiedGroupKFold, one run per fold for k-fold cross-validation); in regression the class is
the quantile bin of the target (splits.strata). A `split` column in labels.csv replaces both; if
it names only train and test, validation patients are carved from train. Either way no patient may
appear in two splits. Unreadable files stay in the manifest with the reason in
`error` and an empty split; the validate stage decides if that is fatal.

What a file holds (sha256, size and depth, the hashed DICOM PatientID, its near-duplicate signature)
is read once per content and kept in data/cache/facts (components.data.scan_facts), so a run after an
append hashes, decodes and compares only the new scans (`--cache` moves it); the outputs are the
same bytes as a run without it.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from components import common
from components.common import SPLITS
from components.data import fact_shards, folders, labels_csv, near_duplicates, scan_facts, splits, stat_index
from components.data.manifest import COLUMNS, read_manifest_rows, target_stats
from components.params import Params, load_params

log = logging.getLogger("medtune.ingest")

NO_PATIENT = "none (one image = one patient)"
SOURCE_NAMES = {
    "csv": "labels.csv patient_id",
    "dicom": "DICOM PatientID",
    "pattern": "data.patient_pattern",
    "none": NO_PATIENT,
}


def find_scans(raw_dir: Path, labels_name: str = "labels.csv") -> folders.Listing:
    """The scans under raw_dir (sorted posix paths relative to it) and every other entry with the
    reason it is skipped (components.data.folders); the skipped ones are logged, and listed by validate."""
    listing = folders.list_folder(raw_dir, labels_name)
    hidden = listing.with_reason(folders.HIDDEN)
    if hidden:
        log.info(
            "%s: skipped %d hidden entr(ies) (names starting with '.' or '_'), e.g. %s",
            raw_dir,
            len(hidden),
            hidden[:5],
        )
    others = [s for s in listing.skipped if s.reason != folders.HIDDEN]
    if others:
        log.warning("%s: %s", raw_dir, folders.summary(folders.Listing(skipped=others)))
    return listing


def folder_label(rel: str) -> str:
    """The label of a file in the folder-per-class layout: its top folder ("" for a file at the top)."""
    return rel.split("/")[0] if "/" in rel else ""


def scan_row(
    path: Path, rel: str, label: str, csv_patient: str, regex: re.Pattern | None, salt: bytes
) -> tuple[dict, str, np.ndarray | None]:
    """`fact_row` of the scan at path, read now (no cache), and its near-duplicate signature (None if
    unreadable). Shared by ingest's tests and the retrain inbox."""
    sha256, decoder = scan_facts.hash_file(str(path))
    fact, signature = scan_facts.probe_file(salt, (str(path), sha256, decoder))
    row, source = fact_row(fact, rel, label, csv_patient, regex, salt)
    return row, source, None if fact.error else signature


def fact_row(
    fact: fact_shards.Fact, rel: str, label: str, csv_patient: str, regex: re.Pattern | None, salt: bytes
) -> tuple[dict, str]:
    """One manifest row (COLUMNS, split and similar_group empty) for the scan at rel with these facts, and
    where its patient came from: 'csv' (csv_patient), 'dicom' (PatientID), 'pattern' (regex on the
    file name) or 'none' (the file is its own patient). Only the hash of an id is kept (the DICOM
    one was hashed under `salt` when the file was read)."""
    row = dict.fromkeys(COLUMNS, "")
    # A file too large to be a scan is refused by probe from its size alone, and never hashed.
    row.update(path=rel, label=label, sha256=fact.sha256)
    if fact.error:
        row["error"] = fact.error_at(rel)  # relative: the manifest must not change with the checkout's place
    else:
        row.update(
            width=fact.width,
            height=fact.height,
            channels=fact.channels,
            bit_depth=fact.bit_depth,
            modality=fact.modality,
        )
    match = regex.search(rel.rsplit("/", 1)[-1]) if regex else None
    if csv_patient:
        row["patient"], source = common.hash_patient(csv_patient, salt), "csv"
    elif fact.patient:
        row["patient"], source = fact.patient, "dicom"
    elif match and match.group("patient"):
        row["patient"], source = common.hash_patient(match.group("patient"), salt), "pattern"
    else:
        row["patient"], source = common.hash_patient(rel, salt), "none"
    return row, source


def previous_splits(manifest_csv: Path) -> dict[str, str]:
    """patient -> split in the manifest an earlier ingest wrote (empty when there is none)."""
    if not manifest_csv.is_file():
        return {}
    try:
        rows = read_manifest_rows(manifest_csv, ("patient", "split"))
    except common.StageError as exc:
        raise common.StageError(
            f"{exc} It holds the splits that `split.method: stable` keeps; delete it to split afresh."
        ) from None
    return {r["patient"]: r["split"] for r in rows if r["split"]}


def assign_splits(
    df: pd.DataFrame, strata: list[str], units: list[str], table: pd.DataFrame | None, out_dir: Path, params: Params
) -> tuple[list[str], str, str]:
    """(split per readable row of df, its source, how it was made); see components.data.splits. `strata`
    is what the split balances per row (splits.strata: the label, or the target's bin in regression)."""
    labels, patients = strata, list(df["patient"])
    what = "target bin" if params.data.regression else "class"
    if table is not None and "split" in table.columns:
        given = [table.loc[p, "split"] if p in table.index else "" for p in df["path"]]
        if "val" in given:
            return given, "labels.csv", "explicit split column in labels.csv"
        # Public sets often give only train and test: validation patients come from train, never test.
        train = [i for i, s in enumerate(given) if s == "train"]
        carved = splits.stable_split(
            [labels[i] for i in train],
            [units[i] for i in train],
            [patients[i] for i in train],
            previous_splits(out_dir / "manifest.csv"),
            params,
            ("train", "val"),
        )
        for i, s in zip(train, carved):
            given[i] = s
        return given, "labels.csv", "labels.csv split column; validation patients carved from its train split"
    if params.split.method == "stable":
        previous = previous_splits(out_dir / "manifest.csv")
        return (
            splits.stable_split(labels, units, patients, previous, params),
            "stable",
            f"stable: groups keep their split as data grows; new groups go where their {what} is short",
        )
    return (
        splits.stratified_split(labels, units, params),
        "stratified-group",
        "StratifiedGroupKFold (patient-level, stratified by "
        + ("quantile bin of the target)" if params.data.regression else "label)"),
    )


def ingest(raw_dir: Path, out_dir: Path, params: Params, cache_dir: Path | None = None) -> pd.DataFrame:
    """Write out_dir/manifest.csv and out_dir/manifest.json for the scans under raw_dir. What each file
    holds is read once per content and kept in cache_dir (default out_dir/cache/facts;
    components.data.scan_facts): the outputs are the same bytes with the cache warm, cold or absent."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    cache_dir = stat_index.facts_dir(out_dir) if cache_dir is None else Path(cache_dir)
    found = _list_raw(raw_dir, params)
    files = found.scans
    table = labels_csv.read_labels_csv(raw_dir, params, files) if params.data.label_source == "csv" else None
    regex, salt = params.data.patient_regex(), common.patient_salt(params.data.patient_salt)
    known = scan_facts.gather(raw_dir, files, cache_dir, salt, params.compute, found)
    df, sources = _manifest_rows(files, known.facts, table, regex, salt)
    readable = (df["error"] == "").to_numpy()
    linked = _group_near_duplicates(df, readable, known, params.split.near_duplicate_correlation)
    split_source, method, edges = _fill_splits(df, readable, linked, table, out_dir, params)
    warn = _warnings(files, table, sources, params)
    for w in warn:
        log.warning(w)
    n_real = len(sources) - sources.count("none")  # scans whose patient hash stands for a real id
    common.warn_public_salt(params.data.patient_salt, str(raw_dir), n_real, log)
    _write_manifest_csv(df, out_dir / "manifest.csv")
    manifest = _manifest_record(df, readable, found, sources, (split_source, method, edges), warn, raw_dir, params)
    common.write_json(out_dir / "manifest.json", manifest)
    log.info(
        "manifest: %d images (%d unreadable), patients %s, images per split %s",
        len(df),
        manifest["n_unreadable"],
        manifest["split"]["patients"],
        {s: sum(c.values()) for s, c in manifest["counts"].items()},
    )
    return df


def _list_raw(raw_dir: Path, params: Params) -> folders.Listing:
    """find_scans of raw_dir; StageError when the folder is missing or holds no scan."""
    if not raw_dir.is_dir():
        raise common.StageError(
            f"raw data folder {raw_dir} not found; expected scans in folder-per-class layout "
            "(or labels.csv); `medtune demo-data --out data/raw` writes a demo set."
        )
    found = find_scans(raw_dir, params.data.labels_csv)
    if not found.scans:
        raise common.StageError(
            f"{raw_dir}: no scan files found; expected PNG, JPEG or DICOM files. " + folders.summary(found)
        )
    return found


def _manifest_rows(
    files: list[str],
    facts: Sequence[fact_shards.Fact],
    table: pd.DataFrame | None,
    regex: re.Pattern | None,
    salt: bytes,
) -> tuple[pd.DataFrame, list[str]]:
    """The manifest rows of `files` (their `fact_row`, split and similar_group empty), labelled by
    labels.csv (`table`, indexed by path) or else by folder, and where each row's patient came from."""
    rows, sources = [], []
    for rel, fact in zip(files, facts):
        csv_row = table.loc[rel] if table is not None and rel in table.index else None
        label = folder_label(rel) if table is None else csv_row["label"] if csv_row is not None else ""
        patient = csv_row.get("patient_id", "") if csv_row is not None else ""
        row, source = fact_row(fact, rel, label, patient, regex, salt)
        rows.append(row)
        sources.append(source)
    return pd.DataFrame(rows, columns=COLUMNS), sources


def _group_near_duplicates(
    df: pd.DataFrame, readable: np.ndarray, known: scan_facts.Found, threshold: float | None
) -> list[tuple[int, int]]:
    """Fill similar_group of df's readable rows (components.data.near_duplicates) and return the links
    between those rows (positions among them) that keep a group in one split."""
    readable_rows = np.flatnonzero(readable)
    linked = known.links(readable_rows, threshold) if threshold is not None and len(readable_rows) else []
    leader = near_duplicates.leaders(len(readable_rows), linked)
    df.loc[readable, "similar_group"] = near_duplicates.groups(list(df["path"][readable]), leader)
    return near_duplicates.links(leader)


def _fill_splits(
    df: pd.DataFrame,
    readable: np.ndarray,
    linked: list[tuple[int, int]],
    table: pd.DataFrame | None,
    out_dir: Path,
    params: Params,
) -> tuple[str, str, list[float] | None]:
    """Fill the split of df's readable rows; return its source, how it was made and the target bins'
    inner edges (regression; None in classification). StageError when a patient lands in two splits or
    validation is left empty (components.data.splits)."""
    units = splits.split_groups(list(df["patient"][readable]), list(df["sha256"][readable]), linked)
    strata, edges = splits.strata(list(df["label"][readable]), units, params)
    assigned, split_source, method = assign_splits(df[readable], strata, units, table, out_dir, params)
    df.loc[readable, "split"] = assigned
    splits.check_overlap(list(df["patient"]), list(df["path"]), list(df["split"]), split_source)
    splits.require_val(assigned, len(set(units)), params)
    return split_source, method, edges


def _warnings(files: list[str], table: pd.DataFrame | None, sources: list[str], params: Params) -> list[str]:
    """What manifest.json's `warnings` say: scans without a labels.csv row, scans without a patient id."""
    warn = []
    if table is not None:
        unlabelled = [f for f in files if f not in table.index]
        if unlabelled:
            warn.append(
                f"{len(unlabelled)} scan file(s) have no row in {params.data.labels_csv} and get an empty "
                f"label (e.g. {unlabelled[:3]}); add them to the CSV or remove them."
            )
    n_none = sources.count("none")
    if n_none:
        warn.append(
            f"{n_none} of {len(files)} image(s) have no patient id (no labels.csv patient_id, no DICOM "
            "PatientID, no match of data.patient_pattern), so each is treated as its own patient: slices "
            "of one patient may leak across train/val/test and inflate the test metrics. Set "
            "data.patient_pattern in params.yaml to a regex whose group 'patient' matches the file name "
            "(e.g. '^(?P<patient>[^_]+)_' for 'p017_03.png'), or add a patient_id column to labels.csv."
        )
    return warn


def _patient_source(sources: list[str]) -> str:
    """manifest.json's `patient_source`: the one source of every row's patient, or each with its count."""
    used = sorted(set(sources), key=list(SOURCE_NAMES).index)
    return (
        SOURCE_NAMES[used[0]]
        if len(used) == 1
        else "mixed: " + ", ".join(f"{SOURCE_NAMES[s]} ({sources.count(s)})" for s in used)
    )


def _write_manifest_csv(df: pd.DataFrame, target: Path) -> None:
    """Write df to target; its size and depth columns become nullable integers first (in df too), so an
    unreadable row's stay empty and the others print without a decimal point."""
    for col in ("width", "height", "channels", "bit_depth"):
        df[col] = pd.array([None if v == "" else v for v in df[col]], dtype="Int64")
    with common.atomic_path(target) as tmp:
        df.to_csv(tmp, index=False, lineterminator="\n")


def _manifest_record(
    df: pd.DataFrame,
    readable: np.ndarray,
    found: folders.Listing,
    sources: list[str],
    split: tuple[str, str, list[float] | None],
    warn: list[str],
    raw_dir: Path,
    params: Params,
) -> dict:
    """manifest.json: what ingest made of raw_dir (counts, how it split, the patients' source and salt)."""
    split_source, method, edges = split
    ok = df[readable]
    similar = ok["similar_group"][ok["similar_group"] != ""]
    counts = _counts(ok, params)
    listing = "".join(f"{p}  {h}\n" for p, h in zip(df["path"], df["sha256"]))  # sha256sum format, sorted
    n_real = len(sources) - sources.count("none")
    record = {
        "data_version": common.dvc_data_version(raw_dir),
        "content_hash": common.sha256_bytes(listing.encode()),
        "n_images": len(df),
        "n_unreadable": int((~readable).sum()),
        "counts": counts,
        "split": {
            "method": method,
            "source": split_source,
            "seed": params.split.seed,
            "test_fold": params.split.test_fold if split_source == "stratified-group" else None,
            "val_fraction": params.split.val_fraction,
            "test_fraction": params.split.test_fraction,
            "patients": {s: int(ok[ok["split"] == s]["patient"].nunique()) for s in SPLITS},
            "patient_overlap": 0,
        },
        "patient_source": _patient_source(sources),
        # Which salt hashed the patients (never the salt): a public one makes them re-identifiable.
        "patient_salt": {**common.salt_status(params.data.patient_salt), "real_patient_ids": n_real > 0},
        "near_duplicates": {
            "correlation": params.split.near_duplicate_correlation,
            "groups": int(similar.nunique()),
            "images": len(similar),
        },
        # Every entry under raw_dir that is not in manifest.csv, with why (validate lists them).
        "skipped": [{"path": s.path, "reason": s.reason} for s in found.skipped],
        "warnings": warn,
    }
    if params.data.regression:
        record["task"] = "regression"
        record["split"]["target_bin_edges"] = edges
        record["target_stats"] = target_stats(list(ok["label"]), list(ok["split"]))
    return record


def _counts(ok: pd.DataFrame, params: Params) -> dict[str, dict[str, int]]:
    """manifest.json's `counts`: images per split and class (data.classes first, then any other label);
    in regression, whose labels are numbers, images per split ({split: {"images": n}})."""
    if params.data.regression:
        return {s: {"images": int((ok["split"] == s).sum())} for s in SPLITS}
    classes = list(params.data.classes) + sorted(set(ok["label"]) - set(params.data.classes))
    return {s: {c: int(((ok["split"] == s) & (ok["label"] == c)).sum()) for c in classes} for s in SPLITS}


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--raw", type=Path, default=None, help="raw scans folder (default: data.raw_dir)")
    parser.add_argument(
        "--out", type=Path, default=Path("data"), help="folder for manifest.csv and manifest.json (default: data)"
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help="per-scan facts cache, a DVC output (default: OUT/cache/facts)"
    )


def _run(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    ingest(args.raw or Path(params.data.raw_dir), args.out, params, args.cache)


def main(argv: Sequence[str] | None = None) -> int:
    return common.stage_main(__doc__.splitlines()[0], _add_args, _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
