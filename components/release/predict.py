"""Run an exported medtune ONNX model on scans and write one CSV row per file.

    medtune predict models/model.onnx scans/ more/scan.dcm -o predictions.csv --batch-size 32

Everything the model needs is read from the ONNX file's metadata (written by `medtune export`):
the class names, the preprocessing (image size, channels, DICOM window; repeated here with
`scans.prepare_image`, the same code preprocess used for training) and the decision rule of the
evaluation (binary: positive class iff its probability >= the evaluated threshold; otherwise
argmax). Folders are searched recursively for scans (`folders.list_folder`; a link out of a folder or a
file too large to be a scan is not opened and gets a row with that error). A file that cannot be
read gets a row with its error and empty probabilities; it does not stop the run.

Decoding stays off the critical path: threads (`--threads`, one per core by default) prepare the next
files while ONNX Runtime runs the current batch; both PIL's decoders and resampling and ONNX Runtime
run outside the GIL. Results are taken in input order, so the CSV is the same whatever the number of
threads, and at most two batches are prepared ahead, so memory does not grow with the number of files.

Output columns: `path, prob_<class>..., predicted, error`; for a regression model (metadata `task`:
regression) `path, value, error`, the value in the target's unit as the graph computes it (its
output `value`: the network's output times the train targets' std plus their mean), empty for an
unreadable file. The command imports neither torch, scipy nor
pandas (fast start); `predict()` returns the table as a pandas DataFrame for Python callers.

`--explain DIR` also writes a Grad-CAM overlay per readable scan to DIR (`<scan stem>.png`) and adds a
column `explanation` naming it: this needs the checkpoint the model was exported from and torch
(components/release/explain_scans.py), imported only then.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from components.common import StageError, atomic_path, stage_main
from components.data.folders import REFUSED, list_folder
from components.data.scans import ScanError, prepare_image, recorded_preparation
from components.model.decision import predict_labels
from components.release.onnx_runtime import make_session, read_metadata, task_of

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("medtune.predict")


def open_model(model_path: Path) -> tuple[Any, dict[str, Any]]:
    """An ONNX Runtime session on a model written by `medtune export`, and its medtune metadata (JSON
    values decoded, onnx_runtime.read_metadata); StageError if it is not one. The metadata is read
    through the session: running a model does not need the `onnx` package, and a file ONNX Runtime
    cannot load is refused with why."""
    if not model_path.is_file():
        raise StageError(f"{model_path}: no such model file; expected an ONNX file written by `medtune export`.")
    # Not spinning: the decoding threads need the cores between ONNX Runtime's operators and runs
    # (with spin-waiting threads, predict lost a third of its rate on 2 cores; bench/cheap.py).
    session = make_session(model_path, spinning=False)
    meta = read_metadata(model_path, session)
    try:
        meta["preparation"] = recorded_preparation(meta["preprocessing"])  # prepare_image's settings
    except ValueError as exc:
        raise StageError(f"{model_path}: {exc}; re-export the model with `medtune export`.") from None
    return session, meta


def expand_paths(paths: Iterable[str | Path]) -> tuple[list[Path], dict[Path, str]]:
    """Files as given (whatever their type: the user asked for them) plus scans found in folders, and
    the entries of folders that are refused (a link out of the folder, a file too large to be a scan),
    each with why it is not read (components.data.folders)."""
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
        return predict_labels(probs, classes.index(positive), float(threshold))
    return probs.argmax(axis=1)


def default_threads() -> int:
    """Decoding threads: one per core this process may use (its CPU affinity)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _prepare(path: Path, settings: dict[str, Any]) -> np.ndarray | str:
    """One file's model input, or the error naming the file (a bad file is a row, not a stop)."""
    try:
        return prepare_image(path, **settings)
    except (ScanError, OSError, ValueError) as exc:
        return str(exc) if str(path) in str(exc) else f"{path}: {exc}"


def prepared(files: Sequence[Path], settings: dict[str, Any], threads: int, ahead: int) -> Iterator[np.ndarray | str]:
    """`_prepare` of each file, in file order, computed by `threads` threads at most `ahead` files
    ahead of the consumer (so memory stays a few batches whatever the number of files)."""
    if threads <= 1:
        yield from (_prepare(f, settings) for f in files)
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="medtune-decode")
    try:
        pending = deque(pool.submit(_prepare, f, settings) for f in files[:ahead])
        for f in files[ahead:]:
            yield pending.popleft().result()
            pending.append(pool.submit(_prepare, f, settings))
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a stop (an ONNX error) leaves no thread decoding


@dataclass
class Predictions:
    """One row per file, in input order; an unreadable file has NaN probabilities, no prediction and its
    error. A regression model's (`task` regression) `probs` is its one output, the value, per file."""

    model_id: str
    classes: list[str]
    files: list[Path]
    probs: np.ndarray
    predicted: list[str]
    errors: list[str]
    explanations: list[str] | None = None  # the overlay of each scan (--explain); "" for an unreadable one
    task: str = "classification"

    def columns(self) -> dict[str, list[Any]]:
        """The CSV's columns in order: path, prob_<class>... (6 decimals), predicted, error[, explanation];
        a regression's path, value (the float32 the graph gave, as its shortest repr), error[, explanation]."""
        explained = {} if self.explanations is None else {"explanation": self.explanations}
        if self.task == "regression":
            # float32 -> the shortest decimal that reads back as that float32: the graph's value, no more digits
            values = [float(np.format_float_positional(v, unique=True)) for v in self.probs[:, 0].astype(np.float32)]
            return {"path": [f.as_posix() for f in self.files], "value": values, "error": self.errors, **explained}
        rounded = np.round(self.probs, 6)
        return {
            "path": [f.as_posix() for f in self.files],
            **{f"prob_{c}": rounded[:, j].tolist() for j, c in enumerate(self.classes)},
            "predicted": self.predicted,
            "error": self.errors,
            **explained,
        }


def run_model(
    model_path: str | Path, paths: Sequence[str | Path], batch_size: int = 32, threads: int | None = None
) -> Predictions:
    """The model on every scan in `paths`; `threads` decode (default: one per core; 1: this thread only)."""
    model_path = Path(model_path)
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} is invalid; expected an integer >= 1.")
    threads = default_threads() if threads is None else threads
    if threads < 1:
        raise ValueError(f"--threads {threads} is invalid; expected an integer >= 1.")
    session, meta = open_model(model_path)
    input_name = meta["input"].get("name", "image") if isinstance(meta["input"], dict) else "image"
    files, refused = expand_paths(paths)
    if not files:
        raise StageError(f"no scans found in {[str(p) for p in paths]}; expected PNG, JPEG or DICOM files or folders.")

    regression = task_of(meta) == "regression"
    probs = np.full((len(files), 1 if regression else len(meta["classes"])), np.nan)
    errors = [refused.get(f, "") for f in files]
    batch: list[np.ndarray] = []
    rows: list[int] = []

    def flush() -> None:
        if batch:
            x = np.stack(batch).astype(np.float32) / 255.0  # the graph does the rest (see its metadata)
            probs[rows] = session.run([meta["output"]], {input_name: x})[0]
            batch.clear()
            rows.clear()

    todo = [i for i, f in enumerate(files) if f not in refused]
    # Two batches ahead: the threads decode the next one while ONNX Runtime runs this one.
    for i, item in zip(todo, prepared([files[i] for i in todo], meta["preparation"], threads, 2 * batch_size)):
        if isinstance(item, str):
            errors[i] = item
            continue
        batch.append(item)
        rows.append(i)
        if len(batch) >= batch_size:
            flush()
    flush()

    ok = np.array([not e for e in errors])
    predicted = np.full(len(files), "", dtype=object)
    if ok.any() and not regression:
        predicted[ok] = np.asarray(meta["classes"], dtype=object)[decide(probs[ok], meta)]
    task = task_of(meta)
    return Predictions(meta["model_id"], list(meta["classes"]), files, probs, predicted.tolist(), errors, task=task)


def explain(
    pred: Predictions, explainer: tuple[Any, dict[str, Any]], out_dir: str | Path, batch_size: int, threads: int | None
) -> list[str]:
    """A Grad-CAM overlay per readable scan of `pred` in `out_dir` (components/release/explain_scans.py),
    for the predicted class; returns each scan's overlay path ("" for an unreadable scan). The scans
    are decoded again, as run_model decoded them, a batch at a time."""
    from components.release.explain_scans import overlay_names, write_overlays

    model, meta = explainer
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ok = [i for i, e in enumerate(pred.errors) if not e]
    names = dict(zip(ok, overlay_names([pred.files[i] for i in ok])))
    written = [""] * len(pred.files)
    threads = default_threads() if threads is None else threads
    batch: list[tuple[int, np.ndarray]] = []
    settings = recorded_preparation(meta["preprocessing"])  # as open_model read it for run_model
    items = prepared([pred.files[i] for i in ok], settings, threads, 2 * batch_size)
    for n, (i, item) in enumerate(zip(ok, items), start=1):
        if isinstance(item, str):  # readable a moment ago: changed or removed since
            log.warning("no explanation for %s", item)
        else:
            batch.append((i, item))
        if batch and (len(batch) >= batch_size or n == len(ok)):
            rows = [r for r, _ in batch]
            paths = [out_dir / names[r] for r in rows]
            # the predicted class's map; a regression's one output
            targets = [0 if pred.task == "regression" else pred.classes.index(pred.predicted[r]) for r in rows]
            write_overlays(model, meta, np.stack([x for _, x in batch]), targets, paths)
            for r, path in zip(rows, paths):
                written[r] = path.as_posix()
            batch.clear()
    log.info("wrote %d Grad-CAM overlay(s) to %s", sum(1 for w in written if w), out_dir)
    return written


def write_csv(pred: Predictions, out_csv: str | Path) -> None:
    """The CSV, atomically, written as pandas' `to_csv(index=False)` writes the same table: a float as
    its shortest repr, NaN as an empty cell, minimal quoting, "\n" line ends."""
    cols = pred.columns()
    with atomic_path(out_csv) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(cols)
        writer.writerows([_cell(v) for v in row] for row in zip(*cols.values()))


def _cell(value: Any) -> Any:
    return ("" if value != value else repr(value)) if isinstance(value, float) else value


def report(pred: Predictions, out_csv: str | Path | None) -> None:
    """One log line: how many files were predicted as what, how many were unreadable."""
    n_bad = sum(1 for e in pred.errors if e)
    if pred.task == "regression":
        values = pred.probs[[not e for e in pred.errors], 0]
        what = f"values {values.min():.4g} to {values.max():.4g}" if len(values) else "no values"
    else:
        what = str(dict(Counter(p for p, e in zip(pred.predicted, pred.errors) if not e).most_common()))
    summary = (
        f"predicted {len(pred.files) - n_bad} of {len(pred.files)} file(s) with model {pred.model_id}: "
        f"{what}; {n_bad} unreadable" + (f" (see the error column of {out_csv})" if n_bad and out_csv else "")
    )
    (log.warning if n_bad else log.info)(summary)


def predict(
    model_path: str | Path,
    paths: Sequence[str | Path],
    out_csv: str | Path | None,
    batch_size: int = 32,
    threads: int | None = None,
    explain_dir: str | Path | None = None,
) -> pd.DataFrame:
    """Predict every scan in `paths`; write `out_csv` (if given) and return the same table. With
    `explain_dir`, also a Grad-CAM overlay per scan there and an `explanation` column naming it."""
    import pandas as pd

    pred = _run(model_path, paths, batch_size, threads, explain_dir)
    if out_csv is not None:
        write_csv(pred, out_csv)
    report(pred, out_csv)
    return pd.DataFrame(pred.columns())


def _run(
    model_path: str | Path,
    paths: Sequence[str | Path],
    batch_size: int,
    threads: int | None,
    explain_dir: str | Path | None,
) -> Predictions:
    """run_model, and with `explain_dir` the overlays. The checkpoint is found and loaded first, so a
    missing one stops the run before any scan is read. torch is imported only here, with --explain."""
    explainer = None
    if explain_dir is not None:
        from components.release.explain_scans import load_explainer

        explainer = load_explainer(Path(model_path))
    pred = run_model(model_path, paths, batch_size, threads)
    if explainer is not None:
        pred.explanations = explain(pred, explainer, explain_dir, batch_size, threads)
    return pred


def main(argv: Sequence[str] | None = None) -> int:
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="ONNX model written by `medtune export` (e.g. models/model.onnx)")
        p.add_argument("paths", nargs="+", help="scan files and/or folders (searched recursively)")
        p.add_argument("-o", "--output", default="predictions.csv", help="CSV to write (default: predictions.csv)")
        p.add_argument("--batch-size", type=int, default=32, help="images per ONNX Runtime call (default: 32)")
        p.add_argument(
            "--threads",
            type=int,
            default=None,
            help="threads decoding scans while the model runs (default: one per core; 1: none)",
        )
        p.add_argument(
            "--explain",
            metavar="DIR",
            default=None,
            help="also write a Grad-CAM overlay per scan to DIR (<scan stem>.png) and an `explanation` column; "
            "needs the model's model.pt (beside the ONNX file, models/ or registry/models/<id>/) and torch",
        )

    def run(args: argparse.Namespace) -> None:  # predict() without the DataFrame: no pandas to import
        pred = _run(args.model, args.paths, args.batch_size, args.threads, args.explain)
        write_csv(pred, args.output)
        report(pred, args.output)

    return stage_main(
        "Run an exported medtune ONNX model on scans; write path,prob_<class>...,predicted,error "
        "(a regression model: path,value,error).",
        add_args,
        run,
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
