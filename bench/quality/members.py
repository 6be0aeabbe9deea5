"""Every trained model of a data set's experiments, one member at a time: how far apart seeds land.

    python -m bench.quality.members pneumoniamnist [K]    # K: ensemble size for the last lines (3)

An ensemble's test AUROC depends on which seeds its members got; this shows by how much. For each
experiment in bench/quality/.work/<name> (its git ref under refs/exps), the model.pt that its
dvc.lock names is read from the DVC cache, and each member is scored, with the experiment's
test-time augmentation, on the validation and test splits of the workspace's data/prepared.
Experiments whose data/prepared differs (another image size or preprocessing) are skipped. A
member is the same model wherever it appears (same train and augment params and member seed; the
training is deterministic on a CPU), so it is scored once. Prints a Markdown table and the
Spearman correlation of validation against test AUROC: whether the validation split could pick
the members that generalise. Last, per recipe, the test AUROC that `train.ensemble: K` would reach
for each disjoint run of K stored member seeds (s, s+1, ..., s a multiple of K): a seed spread
from models already trained.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
import yaml
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from bench.quality.harness import WORK, experiments, run
from components.data.preprocess import load_split
from components.model.models import Deployed, Ensemble, load_checkpoint


def out_md5(lock: dict, stage: str, path: str) -> str:
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == path)


def scores(member: torch.nn.Module, x: torch.Tensor, tta: str) -> np.ndarray:
    z = Deployed(member, tta).logits(x)  # the test-time augmentation that evaluate and export apply
    return (z[:, 1] - z[:, 0]).numpy()


def main(name: str, ensemble: int = 3) -> int:
    ws = WORK / name
    if not (ws / "dvc.lock").is_file():
        print(f"skipped: {ws} has no experiments (run python -m bench.quality.{name} first)")
        return 0
    prepared = out_md5(yaml.safe_load((ws / "dvc.lock").read_text()), "preprocess", "data/prepared")
    splits = {}
    for s in ("val", "test"):
        images, index = load_split(ws / "data/prepared", s)
        splits[s] = torch.from_numpy(np.array(images, dtype=np.float32) / 255), index["label_index"].to_numpy() == 1
    rows, recipes = [], {}  # recipes: recipe key -> (first experiment seen, {member seed: test scores})
    torch.set_grad_enabled(False)
    for ref in experiments(ws):
        lock = yaml.safe_load(run(["git", "show", f"{ref}:dvc.lock"], ws).stdout)
        if out_md5(lock, "preprocess", "data/prepared") != prepared:
            continue
        md5 = out_md5(lock, "train", "models/model.pt")
        model, ckpt = load_checkpoint(ws / ".dvc/cache/files/md5" / md5[:2] / md5[2:])
        tta = yaml.safe_load(run(["git", "show", f"{ref}:params.yaml"], ws).stdout)["evaluate"]["tta"]
        train = {k: v for k, v in ckpt["params"]["train"].items() if k not in ("seed", "ensemble")}
        recipe = json.dumps([train, ckpt["params"]["augment"], tta], sort_keys=True)
        first, done = recipes.setdefault(recipe, (ref.rsplit("/", 1)[1], {}))
        for i, member in enumerate(model.members if isinstance(model, Ensemble) else [model]):
            seed = ckpt["params"]["train"]["seed"] + i
            if seed in done:
                continue
            z = {s: scores(member, x, tta) for s, (x, _) in splits.items()}
            done[seed] = z["test"]
            auc = {s: roc_auc_score(y, z[s]) for s, (_, y) in splits.items()}
            rows.append((ckpt["backbone"], seed, auc["val"], auc["test"], first))
    print("| backbone | member seed | val AUROC | test AUROC | recipe (its first experiment) |\n|---|---|---|---|---|")
    for backbone, seed, val, test, exp in sorted(rows):
        print(f"| {backbone} | {seed} | {val:.4f} | {test:.4f} | {exp} |")
    for backbone in sorted({r[0] for r in rows}):
        val, test = zip(*[(r[2], r[3]) for r in rows if r[0] == backbone])
        if len(val) > 2:
            print(
                f"\n{backbone}: {len(val)} members, test AUROC {min(test):.3f}-{max(test):.3f}; "
                f"Spearman(val, test) = {spearmanr(val, test).statistic:.2f}"
            )
    # What `train.ensemble: k` with train.seed s would give: the members' averaged logits (its test AUROC
    # exactly, since temperature scaling does not reorder), over disjoint runs of k member seeds.
    y_test = splits["test"][1]
    for first, done in recipes.values():
        starts = [s for s in sorted(done) if s % ensemble == 0 and all(s + i in done for i in range(ensemble))]
        if len(starts) >= 2:
            aucs = [roc_auc_score(y_test, np.mean([done[s + i] for i in range(ensemble)], axis=0)) for s in starts]
            print(
                f"\nensembles of {ensemble} of the recipe first seen in {first}, seeds {starts}: "
                f"test AUROC {', '.join(f'{a:.4f}' for a in aucs)}; {np.mean(aucs):.3f} ± {np.std(aucs, ddof=1):.3f}"
            )
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(args[0] if args else "pneumoniamnist", int(args[1]) if len(args) > 1 else 3))
