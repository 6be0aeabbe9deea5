"""The whole pipeline on a real data set, compared with published results.

    python -m bench.real_data [--epochs 5] [--size 64]

PneumoniaMNIST (paediatric chest X-ray, 28 px, official split) from ../shared/datasets: imported
with `medtune import-npz`, versioned with `dvc add`, then a real `dvc repro` in a temporary git
repository (EfficientNet-Lite0 from ImageNet, images upsampled to --size). Prints the test AUROC
and accuracy next to the MedMNIST v2 / MedMNIST+ figures. Skips when ../shared is absent.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NPZ = ROOT.parent / "shared/datasets/pneumoniamnist/pneumoniamnist.npz"
PUBLISHED = {  # test set, (AUROC, ACC); ../shared/datasets/README.md
    "ResNet-18 (28), from scratch, MedMNIST v2": (0.944, 0.854),
    "ResNet-18 (224), from scratch, MedMNIST v2": (0.956, 0.864),
    "ResNet-18 (28), ImageNet fine-tuned, MedMNIST+": (0.950, 0.831),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    ap.add_argument("--size", type=int, default=64, help="image size the 28 px images are resized to")
    args = ap.parse_args(argv)
    if not NPZ.is_file():
        print(f"skipped: {NPZ} not found (the real data sets live in ../shared/datasets)")
        return 0
    sys.path.insert(0, str(ROOT / "tests"))
    from workspace import merge, run

    import shutil
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "ws"
        ws.mkdir()
        shutil.copy(ROOT / "dvc.yaml", ws)
        shutil.copytree(ROOT / "components", ws / "components", ignore=shutil.ignore_patterns("__pycache__"))
        params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), {
            "data": {"label_source": "csv", "classes": ["normal", "pneumonia"]},
            # 27 groups of byte-identical 28 px images, some across the official split; kept, since
            # the published figures were measured on the same split. Listed in validation.md.
            "validate": {"max_duplicates": 30},
            "preprocess": {"image_size": args.size},
            "train": {"epochs": args.epochs, "batch_size": 64, "patience": 3},
            "evaluate": {"positive_class": "pneumonia"},
        })
        (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        run(["git", "init", "-q"], ws)
        run(["dvc", "init", "-q"], ws)
        run(["medtune", "import-npz", str(NPZ), "--out", "data/raw", "--classes", "normal,pneumonia"], ws)
        run(["dvc", "add", "-q", "data/raw"], ws)
        start = time.perf_counter()
        out = run(["dvc", "repro"], ws, check=False)
        seconds = time.perf_counter() - start
        if not (ws / "reports/metrics.json").is_file():
            print(f"dvc repro failed before evaluation (exit {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            return 1
        metrics = json.loads((ws / "reports/metrics.json").read_text())
        train = json.loads((ws / "reports/train.json").read_text())
        gate = json.loads((ws / "reports/gate.json").read_text())
    lo, hi = metrics["auroc_ci"]
    print(f"PneumoniaMNIST test set (n={metrics['n_test']}), efficientnet_lite0 ImageNet -> {args.size} px, "
          f"{train['epochs_run']} epochs (best {train['best_epoch']}), dvc repro {seconds:.0f} s "
          f"(exit {out.returncode}), gate {'passed' if gate['passed'] else 'FAILED'}")
    print(f"  medtune   AUROC {metrics['auroc']:.3f} (95% CI {lo:.3f}-{hi:.3f})  ACC {metrics['accuracy']:.3f}  "
          f"sensitivity {metrics['sensitivity']:.3f}  specificity {metrics['specificity']:.3f}")
    for name, (auc, acc) in PUBLISHED.items():
        print(f"  published AUROC {auc:.3f}  ACC {acc:.3f}  ({name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
