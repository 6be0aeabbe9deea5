"""Test AUROC without the test images that have a near-copy in training: how much the official
split's near-duplicates (components.near_duplicates) lift the published-style figure.

    python -m bench.quality.near_copies breastmnist

The workspace bench/quality/.work/<name> is ingested again into a temporary folder (with this
checkout's code and the workspace's params, near-duplicate search on), which names each image's
group of near-duplicates. Then, for every experiment (its git ref under refs/exps), the test
predictions it recorded (reports/test_predictions.csv) are scored twice: on the whole test split,
and on the test images whose group holds no training or validation image.
"""

from __future__ import annotations

import io
import statistics
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml
from sklearn.metrics import roc_auc_score

from bench.quality.harness import WORK, experiments, run
from components.data.ingest import ingest
from components.params import load_params


def unseen(ws: Path) -> set[str]:
    """Test paths whose near-duplicate group (if any) holds no train or val image."""
    with tempfile.TemporaryDirectory(prefix="medtune-near-copies-") as tmp:
        m = ingest(ws / "data/raw", Path(tmp), load_params(ws / "params.yaml"))
    seen = set(m.loc[m["split"].isin(["train", "val"]) & (m["similar_group"] != ""), "similar_group"])
    test = m[m["split"] == "test"]
    return set(test.loc[~test["similar_group"].isin(seen), "path"])


def main(name: str) -> int:
    ws = WORK / name
    if not (ws / "dvc.lock").is_file():
        print(f"skipped: {ws} has no experiments (run python -m bench.quality.{name} first)")
        return 0
    keep = unseen(ws)
    print("| experiment | test AUROC, all | n | test AUROC, no near-copy in train/val | n |\n|---|---|---|---|---|")
    drops = []
    for ref in experiments(ws):
        params = yaml.safe_load(run(["git", "show", f"{ref}:params.yaml"], ws).stdout)
        shown = run(["git", "show", f"{ref}:reports/test_predictions.csv"], ws, check=False)
        if shown.returncode != 0:
            continue
        pred = pd.read_csv(io.StringIO(shown.stdout), dtype={"path": str, "label": str}, keep_default_na=False)
        pos = params["evaluate"]["positive_class"]
        auc = [roc_auc_score(p["label"] == pos, p[f"prob_{pos}"]) for p in (pred, pred[pred["path"].isin(keep)])]
        drops.append(auc[0] - auc[1])
        print(
            f"| {ref.rsplit('/', 1)[1]} | {auc[0]:.4f} | {len(pred)} | {auc[1]:.4f} | {int(pred['path'].isin(keep).sum())} |"
        )
    if drops:
        print(
            f"\nAUROC all minus AUROC without near-copies: {statistics.mean(drops):+.3f} on average over {len(drops)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "breastmnist"))
