"""Stage 3: decode every readable scan once into a uint8 cache that train/evaluate/export memory-map.

    medtune preprocess          # data/manifest.csv + data/raw -> data/prepared/
    dvc repro preprocess

Writes `data/prepared/{train,val,test}.npy` (uint8 `(N, C, H, W)`, row by row into
`np.lib.format.open_memmap`, so memory stays flat whatever the dataset size), `index.csv`
(`split,row,path,sha256,label,label_index,patient`) and `meta.json` (everything `predict` needs
to repeat the preprocessing). The folder is built beside the target and renamed over it, so a
crash never leaves half a cache. Decoding is `components.scans.prepare_image`, the same function
predict uses. Rows with an `error` in the manifest are skipped (validate already accepted them);
a raw file whose sha256 no longer matches the manifest stops the stage.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from components.common import SPLITS, StageError, read_json, sha256_file, stage_main, write_json, write_text
from components.manifest import read_manifest
from components.params import Params, PreprocessParams, load_params
from components.scans import RESIZE_METHOD, ScanError, prepare_image

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


def _fill_split(rows: pd.DataFrame, raw_dir: Path, target: Path, params: Params, bar: tqdm) -> None:
    """Decode `rows` into a new memmap at `target`, one image at a time."""
    pp = params.preprocess
    settings = preparation(pp)
    shape = (len(rows), pp.channels, pp.image_size, pp.image_size)
    out = np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=shape)
    try:
        for i, (rel, digest) in enumerate(zip(rows["path"], rows["sha256"])):
            path = raw_dir / rel
            if not path.is_file():
                raise StageError(f"{path}: listed in the manifest but missing; rerun `medtune ingest`.")
            actual = sha256_file(path)
            if actual != digest:
                raise StageError(f"{path}: sha256 is {actual} but the manifest says {digest}; the file changed "
                                 "after ingest. Rerun `dvc repro` (ingest and validate) so the change is reviewed.")
            try:
                out[i] = prepare_image(path, **settings)
            except ScanError as exc:
                raise StageError(f"{exc} (ingest found it readable; was the file replaced?)") from None
            bar.update(1)
        out.flush()
    finally:
        del out  # close the mapping before the folder is renamed


def preprocess(manifest_csv: Path, raw_dir: Path, out_dir: Path, params: Params) -> dict:
    """Build `out_dir` (train/val/test .npy, index.csv, meta.json) from the manifest; return meta."""
    manifest_csv, raw_dir, out_dir = Path(manifest_csv), Path(raw_dir), Path(out_dir)
    classes = list(params.data.classes)
    df = readable_rows(manifest_csv)
    unknown = df.loc[~df["label"].isin(classes)]
    if len(unknown):
        row = unknown.iloc[0]
        raise StageError(f"{manifest_csv}: {row['path']} has label {row['label']!r}; expected one of {classes} "
                         "(data.classes). Run `medtune validate`.")
    for split in SPLITS:
        if not (df["split"] == split).any():
            raise StageError(f"{manifest_csv}: the {split!r} split has no readable images; add data or change "
                             "split.val_fraction / split.test_fraction, then rerun ingest.")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        index = []
        with tqdm(total=len(df), desc="preprocess", unit="img") as bar:
            for split in SPLITS:
                rows = df.loc[df["split"] == split].reset_index(drop=True)
                _fill_split(rows, raw_dir, tmp / f"{split}.npy", params, bar)
                index.append(rows.assign(row=np.arange(len(rows)), label_index=rows["label"].map(classes.index)))
        index_df = pd.concat(index, ignore_index=True)[INDEX_COLUMNS]
        write_text(tmp / "index.csv", index_df.to_csv(index=False, lineterminator="\n"))
        meta = _meta(index_df, params)
        write_json(tmp / "meta.json", meta)
        _swap_in(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s: %s", out_dir, meta["counts"])
    return meta


def preparation(pp: PreprocessParams) -> dict[str, Any]:
    """scans.prepare_image's settings (scans.PREPARATION) from the params, as meta.json records them."""
    window = [float(v) for v in pp.window] if isinstance(pp.window, list) else pp.window
    return {"image_size": pp.image_size, "channels": pp.channels, "window": window, "equalize": pp.equalize}


def _meta(index_df: pd.DataFrame, params: Params) -> dict:
    class_counts = {s: {c: int(((index_df["split"] == s) & (index_df["label"] == c)).sum())
                        for c in params.data.classes} for s in SPLITS}
    return {
        "classes": list(params.data.classes),
        **preparation(params.preprocess),
        "resize": RESIZE_METHOD,
        "input": "uint8 NCHW",
        "dtype": "uint8",
        "layout": "NCHW",
        "scaling": "divide by 255 for the model's float32 [0, 1] input",
        "decoder": "components.scans.prepare_image",
        "counts": {s: int((index_df["split"] == s).sum()) for s in SPLITS},
        "class_counts": class_counts,
    }


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder over `out_dir`. A directory cannot be os.replace'd over a
    non-empty one, so the old folder is first moved aside; it is deleted only once the new one is in."""
    # mkdtemp makes it 0700; the cache should be as readable as any output folder. (Reading the
    # umask would mean setting it, which races with other threads, e.g. Prefect tasks.)
    os.chmod(tmp, 0o755)
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
    index = pd.read_csv(csv, dtype={**TEXT, "row": np.int64, "label_index": np.int64}, keep_default_na=False)
    index = index.loc[index["split"] == split].sort_values("row").reset_index(drop=True)
    if len(index) == 0:
        raise StageError(f"{prepared_dir}: the {split!r} split is empty; rerun ingest and preprocess with more data.")
    if images.ndim != 4 or images.shape[0] != len(index) or not (index["row"].to_numpy() == np.arange(len(index))).all():
        raise StageError(f"{npy} has shape {images.shape} but {csv} lists {len(index)} {split} rows; the cache is "
                         "inconsistent: rerun `medtune preprocess`.")
    return images, index


def main(argv: Sequence[str] | None = None) -> int:
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--manifest", default="data/manifest.csv", help="manifest from ingest (default: data/manifest.csv)")
        p.add_argument("--raw-dir", default=None, help="raw scans folder (default: data.raw_dir from params)")
        p.add_argument("--validation", default="reports/validation.json",
                       help="validate's report; preprocess refuses data that failed validation")
        p.add_argument("--out", default="data/prepared", help="output folder (default: data/prepared)")

    def run(args: argparse.Namespace) -> None:
        params = load_params(args.params)
        report = read_json(args.validation)
        if not report.get("success", False):
            failed = [f.get("name") for f in report.get("failures", []) if f.get("critical")]
            raise StageError(f"{args.validation} says validation failed (critical: {failed}); fix the data "
                             "and rerun `medtune validate` before preprocessing.")
        preprocess(Path(args.manifest), Path(args.raw_dir or params.data.raw_dir), Path(args.out), params)

    return stage_main("Stage 3: decode, window and resize every readable scan into a uint8 cache.",
                      add_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
