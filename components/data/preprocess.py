"""Stage 3: decode every readable scan into a uint8 array file that train/evaluate/export memory-map.

    medtune preprocess          # data/manifest.csv + data/raw -> data/prepared/ (+ data/cache/pixels)
    dvc repro preprocess

Writes `data/prepared/{train,val,test}.npy` (uint8 `(N, C, H, W)`, a block at a time after
the header np.save writes, so memory stays flat whatever the dataset size), `index.csv`
(`split,row,path,sha256,label,label_index,patient`; in regression, data.task, label_index 0 and a
float `target` column after them) and `meta.json` (everything `predict` needs to repeat the
preprocessing; in regression also "task", "classes": [] and the targets' stats per split). The
folder is built beside the target and renamed over it, so a crash never leaves half of it. Decoding is `components.data.scans.prepare_image`, the same function
predict uses, run through `parallel.imap_files` (local cores, or a Dask cluster).

Each scan is prepared once: its pixels are kept in `data/cache/pixels` (`components/data/pixel_cache.py`),
keyed by the scan's sha256 and everything else they depend on (`cache_settings`), so a run after
an append prepares only the new scans and copies the rest; data/prepared is the same bytes as a
run from scratch. Rows with an `error` in the manifest are skipped (validate already accepted
them); a raw file whose sha256 no longer matches the manifest stops the stage, cached or not. A
file is read for that check only when ingest's stat index (components/data/stat_index.py) does not
vouch for it: a scan whose size, mtime and inode are those ingest recorded with that sha256 has not
changed since; any other file is hashed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import PIL
import pydicom

from components.common import (
    SPLITS,
    StageError,
    read_json,
    replace_dir,
    sha256_file,
    stage_main,
    write_json,
    write_text,
)
from components.data import pixel_cache, scans, stat_index
from components.data.manifest import read_manifest, target_number, target_stats
from components.data.scans import RESIZE_METHOD, ScanError
from components.parallel import decode_seconds, imap_files
from components.parallel import workers as parallel_workers
from components.params import ComputeParams, Params, PreprocessParams, load_params

log = logging.getLogger("medtune.preprocess")

INDEX_COLUMNS = ["split", "row", "path", "sha256", "label", "label_index", "patient"]
TEXT = {"path": str, "sha256": str, "label": str, "patient": str, "split": str}


def readable_rows(manifest_csv: Path) -> pd.DataFrame:
    """The readable rows of the manifest, sorted by (split, path); raises StageError if malformed."""
    df = read_manifest(manifest_csv)
    skipped = df["error"].str.strip() != ""
    if skipped.any():
        log.info("skipping %d unreadable file(s) listed in %s", int(skipped.sum()), manifest_csv)
    df = df.loc[~skipped, ["path", "sha256", "label", "patient", "split"]]
    bad = df.loc[~df["split"].isin(SPLITS)]
    if len(bad):
        row = bad.iloc[0]
        raise StageError(f"{manifest_csv}: {row['path']} has split {row['split']!r}; expected one of {list(SPLITS)}.")
    return df.sort_values(["split", "path"], kind="stable").reset_index(drop=True)


def _checked_rows(manifest_csv: Path, classes: list[str], regression: bool = False) -> pd.DataFrame:
    """readable_rows, refused (StageError) when a label is unknown (regression: not a finite number) or a
    split is empty."""
    df = readable_rows(manifest_csv)
    if regression:
        unknown = df.loc[~np.isfinite([target_number(v) for v in df["label"]])]
        expected = "a finite number (data.task regression: the target)"
    else:
        unknown = df.loc[~df["label"].isin(classes)]
        expected = f"one of {classes} (data.classes)"
    if len(unknown):
        row = unknown.iloc[0]
        raise StageError(
            f"{manifest_csv}: {row['path']} has label {row['label']!r}; expected {expected}. Run `medtune validate`."
        )
    for split in SPLITS:
        if not (df["split"] == split).any():
            raise StageError(
                f"{manifest_csv}: the {split!r} split has no readable images; add data or change "
                "split.val_fraction / split.test_fraction, then rerun ingest."
            )
    return df


def check_and_prepare(item: tuple[str, str, dict[str, Any] | None]) -> np.ndarray | None:
    """(path, manifest sha256, settings or None): check the file still has that sha256, then
    return scans.prepare_image(path, **settings), or None when no settings are given (cached)."""
    path, digest, settings = Path(item[0]), item[1], item[2]
    if not path.is_file():
        raise StageError(f"{path}: listed in the manifest but missing; rerun `medtune ingest`.")
    actual = sha256_file(path)
    if actual != digest:
        raise StageError(
            f"{path}: sha256 is {actual} but the manifest says {digest}; the file changed "
            "after ingest. Rerun `dvc repro` (ingest and validate) so the change is reviewed."
        )
    if settings is None:
        return None
    try:
        return scans.prepare_image(path, **settings)
    except ScanError as exc:
        raise StageError(f"{exc} (ingest found it readable; was the file replaced?)") from None


def _prepare_missing(df: pd.DataFrame, raw_dir: Path, store: pixel_cache.Store, params: Params, facts_dir: Path) -> int:
    """Check every listed file against its sha256 and prepare the scans `store` lacks into one new
    shard, written as they are decoded (a few chunks of pixels in memory at a time); return how many
    it prepared. A scan is keyed by its bytes alone: the path matters to prepare_image only through its extension
    choosing the decoder, and bytes that do not fit it are unreadable (ingest marks them)."""
    new = store.missing(df["sha256"])
    todo = (~df["sha256"].duplicated() & df["sha256"].isin(new)).to_numpy()  # the first row of each new key
    root = os.path.abspath(raw_dir)  # a Dask worker has another working directory
    paths = [os.path.join(root, rel) for rel in df["path"]]
    # Cached scans are checked here; those to prepare, by check_and_prepare as it reads them.
    known = stat_index.known_hashes(raw_dir, df["path"][~todo], facts_dir)
    _check_files(
        [
            (p, key, None)
            for p, rel, key, do in zip(paths, df["path"], df["sha256"], todo)
            if not do and known.get(rel) != key
        ],
        params.compute,
    )
    settings = preparation(params.preprocess)
    items = [(p, key, settings) for p, key, do in zip(paths, df["sha256"], todo) if do]  # in `new` order
    log.info(
        "%d scan(s) to prepare, %d in the pixel cache (%s)", len(new), df["sha256"].nunique() - len(new), store.folder
    )
    # Decoding is the costly part: local processes when it pays for them, or a Dask cluster. Each
    # result goes to the shard file as it comes, so few are in memory at a time.
    decoded = imap_files(
        check_and_prepare,
        items,
        params.compute,
        desc="preprocess",
        work_seconds=decode_seconds(len(items), sum(_size(item[0]) for item in items)),
    )
    with store.new_shard(new) as block:
        for i, pixels in enumerate(decoded):
            block[i] = pixels
    store.compact(df["sha256"])
    return len(new)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:  # missing: check_and_prepare says so
        return 0


def _check_files(items: list[tuple[str, str, None]], compute: ComputeParams) -> None:
    """check_and_prepare (sha256 only) on threads: hashlib releases the GIL, and a process pool's
    start-up (importing this stage in each worker) would cost more than hashing small files."""
    if not items:
        return
    with ThreadPoolExecutor(parallel_workers(compute)) as pool:
        for _ in pool.map(check_and_prepare, items):
            pass


def _fill_split(keys: pd.Series, store: pixel_cache.Store, target: Path) -> None:
    """Write the pixels of `keys` from the cache as an .npy at `target`, a block at a time. Written, not
    memory-mapped: every page written through a mapping stays in this process's memory until it is
    unmapped, so a full split (4 KB a scan) made the stage's peak memory grow with the number of scans."""
    with open(target, "wb") as fh:
        split = pixel_cache.ShardWriter(fh, len(keys), store.shape)  # the bytes np.save writes
        for _, pixels in store.blocks(list(keys)):
            split.append(pixels)


def cache_settings(pp: PreprocessParams) -> dict[str, Any]:
    """Everything a scan's prepared pixels depend on besides its bytes: the pixel cache's key.
    The decoder is identified by the code (scans.py) and the libraries that run it, not by a
    version number someone must remember to bump: a cached image is always the bytes a run from
    scratch would write."""
    decoder = {
        "scans.py": sha256_file(scans.__file__),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "pydicom": pydicom.__version__,
    }
    return {**preparation(pp), "resize": RESIZE_METHOD, "decoder": decoder}


def default_cache_dir(out_dir: Path) -> Path:
    """cache/pixels beside the output folder: data/prepared -> data/cache/pixels (dvc.yaml's output)."""
    return Path(out_dir).parent / "cache" / "pixels"


def preprocess(
    manifest_csv: Path,
    raw_dir: Path,
    out_dir: Path,
    params: Params,
    cache_dir: Path | None = None,
    facts_dir: Path | None = None,
) -> dict:
    """Build `out_dir` (train/val/test .npy, index.csv, meta.json) from the manifest; return meta.
    Scans already in the pixel cache (`cache_dir`, default `default_cache_dir(out_dir)`) are copied
    from it, the others prepared and added to it; `out_dir` is the same bytes either way.
    `facts_dir` is ingest's facts cache (default: cache/facts beside the manifest), whose stat index
    spares re-hashing unchanged scans; without one every scan is hashed."""
    manifest_csv, raw_dir, out_dir = Path(manifest_csv), Path(raw_dir), Path(out_dir)
    regression = params.data.regression
    classes = [] if regression else list(params.data.classes)
    df = _checked_rows(manifest_csv, classes, regression)
    pp = params.preprocess
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(out_dir)
    store = pixel_cache.open_store(cache_dir, cache_settings(pp), (pp.channels, pp.image_size, pp.image_size))
    facts_dir = stat_index.facts_dir(manifest_csv.parent) if facts_dir is None else Path(facts_dir)
    prepared = _prepare_missing(df, raw_dir, store, params, facts_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        index = []
        for split in SPLITS:
            rows = df.loc[df["split"] == split].reset_index(drop=True)
            _fill_split(rows["sha256"], store, tmp / f"{split}.npy")
            index.append(rows.assign(row=np.arange(len(rows)), **_label_columns(rows["label"], classes, regression)))
        index_df = pd.concat(index, ignore_index=True)[INDEX_COLUMNS + (["target"] if regression else [])]
        write_text(tmp / "index.csv", index_df.to_csv(index=False, lineterminator="\n"))
        meta = _meta(index_df, params)
        write_json(tmp / "meta.json", meta)
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pixel_cache.drop_other_sets(cache_dir, keep=store)
    log.info("wrote %s: %s (%d scan(s) prepared, the rest from the pixel cache)", out_dir, meta["counts"], prepared)
    return meta


def preparation(pp: PreprocessParams) -> dict[str, Any]:
    """scans.prepare_image's settings (scans.PREPARATION) from the params, as meta.json records them."""
    window = [float(v) for v in pp.window] if isinstance(pp.window, list) else pp.window
    return {"image_size": pp.image_size, "channels": pp.channels, "window": window, "equalize": pp.equalize}


def _label_columns(labels: pd.Series, classes: list[str], regression: bool) -> dict[str, Any]:
    """index.csv's label columns for a split's rows: label_index (the class's place in data.classes); in
    regression label_index 0 for every row (readers that expect one keep working) and `target`, the
    label as a float."""
    if regression:
        return {"label_index": 0, "target": [target_number(v) for v in labels]}
    return {"label_index": labels.map(classes.index)}


def _meta(index_df: pd.DataFrame, params: Params) -> dict:
    """meta.json. Classification: classes and class_counts; regression: "task", "classes": [] and
    target_stats (manifest.target_stats) instead of class_counts. No "task" means classification."""
    regression = params.data.regression
    meta = {
        "classes": [] if regression else list(params.data.classes),
        **preparation(params.preprocess),
        "resize": RESIZE_METHOD,
        "input": "uint8 NCHW",
        "dtype": "uint8",
        "layout": "NCHW",
        "scaling": "divide by 255 for the model's float32 [0, 1] input",
        "decoder": "components.data.scans.prepare_image",
        "counts": {s: int((index_df["split"] == s).sum()) for s in SPLITS},
    }
    if regression:
        meta["task"] = "regression"
        meta["target_stats"] = target_stats(list(index_df["label"]), list(index_df["split"]))
    else:
        meta["class_counts"] = {
            s: {c: int(((index_df["split"] == s) & (index_df["label"] == c)).sum()) for c in params.data.classes}
            for s in SPLITS
        }
    return meta


def load_meta(prepared_dir: Path) -> dict:
    return read_json(Path(prepared_dir) / "meta.json")


def load_split(prepared_dir: Path, split: str) -> tuple[np.ndarray, pd.DataFrame]:
    """(read-only memmap uint8 (N, C, H, W), that split's index rows sorted by row)."""
    prepared_dir = Path(prepared_dir)
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; expected one of {list(SPLITS)}")
    npy, csv = prepared_dir / f"{split}.npy", prepared_dir / "index.csv"
    for path in (npy, csv):
        if not path.is_file():
            raise StageError(f"{path} not found; run `medtune preprocess` (dvc repro preprocess) first.")
    images = np.load(npy, mmap_mode="r")
    # A regression index's `target` column (float) is read as a number by pandas' own inference.
    index = pd.read_csv(csv, dtype={**TEXT, "row": np.int64, "label_index": np.int64}, keep_default_na=False)
    index = index.loc[index["split"] == split].sort_values("row").reset_index(drop=True)
    if len(index) == 0:
        raise StageError(f"{prepared_dir}: the {split!r} split is empty; rerun ingest and preprocess with more data.")
    if (
        images.ndim != 4
        or images.shape[0] != len(index)
        or not (index["row"].to_numpy() == np.arange(len(index))).all()
    ):
        raise StageError(
            f"{npy} has shape {images.shape} but {csv} lists {len(index)} {split} rows; the cache is "
            "inconsistent: rerun `medtune preprocess`."
        )
    return images, index


def main(argv: Sequence[str] | None = None) -> int:
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--manifest", default="data/manifest.csv", help="manifest from ingest (default: data/manifest.csv)"
        )
        p.add_argument("--raw-dir", default=None, help="raw scans folder (default: data.raw_dir from params)")
        p.add_argument(
            "--validation",
            default="reports/validation.json",
            help="validate's report; preprocess refuses data that failed validation",
        )
        p.add_argument("--out", default="data/prepared", help="output folder (default: data/prepared)")
        p.add_argument(
            "--cache",
            default=None,
            help="pixel cache folder (default: cache/pixels beside --out, i.e. data/cache/pixels)",
        )

    def run(args: argparse.Namespace) -> None:
        params = load_params(args.params)
        report = read_json(args.validation)
        if not report.get("success", False):
            failed = [f.get("name") for f in report.get("failures", []) if f.get("critical")]
            raise StageError(
                f"{args.validation} says validation failed (critical: {failed}); fix the data "
                "and rerun `medtune validate` before preprocessing."
            )
        preprocess(
            Path(args.manifest),
            Path(args.raw_dir or params.data.raw_dir),
            Path(args.out),
            params,
            Path(args.cache) if args.cache else None,
        )

    return stage_main("Stage 3: decode, window and resize every readable scan into a uint8 cache.", add_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
