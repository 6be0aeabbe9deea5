"""`medtune import-npz`: a MedMNIST .npz file as PNG scans plus labels.csv for ingest.

    medtune import-npz pneumoniamnist.npz --out data/raw --classes normal,pneumonia

MedMNIST .npz files hold `train_images`, `val_images`, `test_images` (uint8, (N, H, W)
grey or (N, H, W, 3) colour) and the matching `*_labels` ((N, 1) or (N,), integer class indices).
Every image becomes `OUT/<class>/<split>_<index>.png` and a row `path,label,split` of
`OUT/labels.csv`, so the official split is kept (ingest's split column wins) and a folder-per-class
layout works too. MedMNIST has no patient ids: ingest will say so in its warning.
"""

from __future__ import annotations

import argparse
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from components import common
from components.common import SPLITS
from components.data.importers import counts, params_hint, refuse_earlier_import


def _arrays(npz_path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images uint8 (N,H,W[,3]), labels int (N,))}, checked, or StageError naming the problem."""
    if not npz_path.is_file():
        raise common.StageError(f"{npz_path} not found; expected a MedMNIST-format .npz file.")
    try:
        npz = np.load(npz_path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise common.StageError(f"{npz_path}: not a readable .npz file ({exc}).") from None
    with npz:
        wanted = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels")]
        missing = [k for k in wanted if k not in npz.files]
        if missing:
            raise common.StageError(
                f"{npz_path}: missing key(s) {missing}; found {sorted(npz.files)}, expected {wanted} (MedMNIST format)."
            )
        out = {}
        for s in SPLITS:
            images, labels = npz[f"{s}_images"], npz[f"{s}_labels"]
            if images.ndim == 4 and images.shape[-1] == 1:
                images = images[..., 0]  # explicit single channel: same as grey
            if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
                raise common.StageError(
                    f"{npz_path}: {s}_images is {images.dtype} {images.shape}; expected uint8 "
                    "(N, H, W) or (N, H, W, 3)."
                )
            if labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
                raise common.StageError(
                    f"{npz_path}: {s}_labels has shape {labels.shape}; expected ({images.shape[0]},) "
                    f"or ({images.shape[0]}, 1), one class index per image (multi-label "
                    "datasets such as ChestMNIST are not supported)."
                )
            if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0):
                raise common.StageError(
                    f"{npz_path}: {s}_labels are {labels.dtype} with minimum {labels.min()}; "
                    "expected non-negative integer class indices."
                )
            out[s] = (images, labels.astype(np.int64))
    return out


def _class_names(classes: list[str] | None, n_needed: int, npz_path: Path) -> list[str]:
    if classes is None:
        return [str(i) for i in range(n_needed)]
    if any(not c for c in classes) or len(set(classes)) != len(classes):
        raise ValueError(f"--classes = {','.join(classes)!r} is invalid; expected unique, non-empty names.")
    if len(classes) < n_needed:
        raise ValueError(
            f"--classes = {','.join(classes)!r} names {len(classes)} class(es) but {npz_path} has "
            f"label indices up to {n_needed - 1}; expected {n_needed} names, in index order."
        )
    return classes


def import_npz(npz_path: Path, out_dir: Path, classes: list[str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Write out_dir/<class>/<split>_<index>.png and out_dir/labels.csv; return (labels table, class names)."""
    npz_path, out_dir = Path(npz_path), Path(out_dir)
    data = _arrays(npz_path)
    refuse_earlier_import(out_dir)
    n_needed = 1 + max((int(labels.max()) for _, labels in data.values() if labels.size), default=1)
    names = _class_names(classes, max(n_needed, 2), npz_path)
    rows = []
    for split, (images, labels) in data.items():
        width = max(5, len(str(len(images))))
        for i, (image, label) in enumerate(zip(images, labels)):
            rel = f"{names[label]}/{split}_{i:0{width}d}.png"
            with common.atomic_path(out_dir / rel) as tmp:
                Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")
            rows.append({"path": rel, "label": names[label], "split": split})
    table = pd.DataFrame(rows, columns=["path", "label", "split"])
    common.write_text(out_dir / "labels.csv", table.to_csv(index=False, lineterminator="\n"))
    return table, names


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("npz", type=Path, help="MedMNIST-format .npz file (train/val/test _images and _labels)")
    parser.add_argument("--out", type=Path, default=Path("data/raw"), help="output folder (default: data/raw)")
    parser.add_argument(
        "--classes", default=None, help="comma-separated class names for label indices 0,1,... (default: '0','1',...)"
    )


def _run(args: argparse.Namespace) -> None:
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    table, names = import_npz(args.npz, args.out, classes)
    print(f"wrote {len(table)} PNG files and {args.out / 'labels.csv'} ({counts(table)})")
    print(params_hint(args.out, names))


def main(argv: Sequence[str] | None = None) -> int:
    """`medtune import-npz`."""
    return common.stage_main(
        "Importers: turn a public dataset (an .npz file or a folder tree) into scans plus labels.csv for ingest.",
        _add_args,
        _run,
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
