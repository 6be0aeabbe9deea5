"""Run an exported medtune ONNX model on scans and write one CSV row per file.

    medtune predict models/model.onnx scans/ more/scan.dcm -o predictions.csv --batch-size 32

Everything the model needs is read from the ONNX file's metadata (written by `medtune export`):
the class names, the preprocessing (image size, channels, DICOM window; repeated here with
`scans.prepare_image`, the same code preprocess used for training) and the decision rule of the
evaluation (binary: positive class iff its probability >= the evaluated threshold; otherwise
argmax). Folders are searched recursively for scans (`folders.list_folder`; a link out of a folder or a
file too large to be a scan is not opened and gets a row with that error). A file that cannot be
read gets a row with its error and empty probabilities; it does not stop the run.

Output columns: `path, prob_<class>..., predicted, error`. Torch is not imported (fast start).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components import calibrate
from components.common import StageError, atomic_path, stage_main
from components.onnx_runtime import make_session
from components.folders import REFUSED, list_folder
from components.scans import ScanError, prepare_image, recorded_preparation

log = logging.getLogger("medtune.predict")

REQUIRED_METADATA = ("model_id", "classes", "preprocessing", "input", "output")


def read_metadata(model_path: Path) -> dict[str, Any]:
    """medtune metadata of an ONNX file (JSON values decoded); StageError if it is not one."""
    import onnx

    if not model_path.is_file():
        raise StageError(f"{model_path}: no such model file; expected an ONNX file written by `medtune export`.")
    try:
        # The graph's weights are not needed here; skip loading external data.
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types on non-ONNX bytes
        raise StageError(f"{model_path}: not a readable ONNX file ({type(exc).__name__}: {exc}).") from None
    props = {p.key: p.value for p in proto.metadata_props}
    missing = [k for k in REQUIRED_METADATA if k not in props]
    if missing:
        raise StageError(f"{model_path}: ONNX file has no medtune metadata (missing {missing}); expected a model "
                         "exported by `medtune export`, which records the classes and preprocessing.")
    meta: dict[str, Any] = dict(props)
    for key in ("classes", "preprocessing", "input", "metrics"):
        if key in props:
            try:
                meta[key] = json.loads(props[key])
            except json.JSONDecodeError:
                raise StageError(f"{model_path}: metadata {key!r} is not valid JSON: {props[key][:80]!r}.") from None
    return meta


def expand_paths(paths: Iterable[str | Path]) -> tuple[list[Path], dict[Path, str]]:
    """Files as given (whatever their type: the user asked for them) plus scans found in folders, and
    the entries of folders that are refused (a link out of the folder, a file too large to be a scan),
    each with why it is not read (components.folders)."""
    out: list[Path] = []
    refused: dict[Path, str] = {}
    for p in map(Path, paths):
        if p.is_dir():
            listing = list_folder(p, labels_name=None)
            out += [p / rel for rel in listing.scans]
            for skipped in listing.skipped:
                if skipped.reason in REFUSED:
                    out.append(p / skipped.path)
                    refused[p / skipped.path] = f"{p / skipped.path}: {skipped.reason}"
        else:
            out.append(p)
    return out, refused


def decide(probs: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """Class index per row, with the evaluation's rule (binary threshold on the positive class)."""
    classes = meta["classes"]
    metrics = meta.get("metrics") or {}
    positive, threshold = metrics.get("positive_class"), metrics.get("threshold")
    if len(classes) == 2 and positive in classes and threshold is not None:
        return calibrate.predict_labels(probs, classes.index(positive), float(threshold))
    return probs.argmax(axis=1)


def predict(model_path: str | Path, paths: Sequence[str | Path], out_csv: str | Path | None,
            batch_size: int = 32) -> pd.DataFrame:
    """Predict every scan in `paths`; write `out_csv` (if given) and return the same table."""
    model_path = Path(model_path)
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} is invalid; expected an integer >= 1.")
    meta = read_metadata(model_path)
    classes = meta["classes"]
    try:
        settings = recorded_preparation(meta["preprocessing"])
    except ValueError as exc:
        raise StageError(f"{model_path}: {exc}; re-export the model with `medtune export`.") from None
    input_name = meta["input"].get("name", "image") if isinstance(meta["input"], dict) else "image"
    files, refused = expand_paths(paths)
    if not files:
        raise StageError(f"no scans found in {[str(p) for p in paths]}; expected PNG, JPEG or DICOM files or folders.")
    session = make_session(model_path)

    probs = np.full((len(files), len(classes)), np.nan)
    errors = [""] * len(files)
    batch: list[np.ndarray] = []
    rows: list[int] = []

    def flush() -> None:
        if batch:
            x = np.stack(batch).astype(np.float32) / 255.0  # the graph does the rest (see its metadata)
            probs[rows] = session.run([meta["output"]], {input_name: x})[0]
            batch.clear()
            rows.clear()

    for i, f in enumerate(files):
        if f in refused:
            errors[i] = refused[f]
            continue
        try:
            batch.append(prepare_image(f, **settings))
            rows.append(i)
        except (ScanError, OSError, ValueError) as exc:
            errors[i] = str(exc) if str(f) in str(exc) else f"{f}: {exc}"
        if len(batch) >= batch_size:
            flush()
    flush()

    ok = np.array([not e for e in errors])
    predicted = np.full(len(files), "", dtype=object)
    if ok.any():
        predicted[ok] = np.asarray(classes, dtype=object)[decide(probs[ok], meta)]
    table = pd.DataFrame({"path": [f.as_posix() for f in files]})
    for j, c in enumerate(classes):
        table[f"prob_{c}"] = np.round(probs[:, j], 6)
    table["predicted"] = predicted
    table["error"] = errors
    if out_csv is not None:
        with atomic_path(out_csv) as tmp:
            table.to_csv(tmp, index=False, lineterminator="\n")
    n_bad = int((~ok).sum())
    counts = table.loc[ok, "predicted"].value_counts().to_dict()
    summary = (f"predicted {int(ok.sum())} of {len(files)} file(s) with model {meta['model_id']}: {counts}; "
               f"{n_bad} unreadable" + (f" (see the error column of {out_csv})" if n_bad and out_csv else ""))
    (log.warning if n_bad else log.info)(summary)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="ONNX model written by `medtune export` (e.g. models/model.onnx)")
        p.add_argument("paths", nargs="+", help="scan files and/or folders (searched recursively)")
        p.add_argument("-o", "--output", default="predictions.csv", help="CSV to write (default: predictions.csv)")
        p.add_argument("--batch-size", type=int, default=32, help="images per ONNX Runtime call (default: 32)")

    def run(args: argparse.Namespace) -> None:
        predict(args.model, args.paths, args.output, args.batch_size)

    return stage_main("Run an exported medtune ONNX model on scans; write path,prob_<class>...,predicted,error.",
                      add_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
