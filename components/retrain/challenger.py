"""Champion/challenger: does the model just trained beat the champion on the same test data?

Comparison "on the same test data": the champion's ONNX and the challenger's ONNX are both run with
ONNX Runtime on the challenger's prepared test split, minus the images of patients the champion was
trained or validated on (from the champion's own manifest copy), because the patient-level split is
recomputed when data is added and those images would flatter the champion. compare() promotes only a
model whose code is the committed code (the lineage's `git_dirty`, `unreproducible()`), since the
release tag holds HEAD's code.

A regression (data.task) compares the models' values (their ONNX output `value`, in target units)
against the test targets: on mae or rmse, where lower is better (challenger <= champion + margin), or
on r2, where higher is better like every classification metric (challenger >= champion - margin).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components import common
from components.common import StageError, dvc, git
from components.data.manifest import read_manifest
from components.params import Params
from components.release.onnx_runtime import make_session, read_metadata
from components.release.registry import champion_onnx, current, model_dir, model_id_of

log = logging.getLogger("medtune.challenger")

LOWER_IS_BETTER = ("mae", "rmse")  # errors, in target units; every other compare_metric is a score


# ---------------------------------------------------------------------------------------------
# Champion vs challenger
# ---------------------------------------------------------------------------------------------


def onnx_probabilities(
    onnx_path: str | Path, images: np.ndarray, default_threshold: float, batch: int = 64
) -> tuple[np.ndarray, float]:
    """The model's probabilities on uint8 `images`, and the binary threshold it was evaluated (and is
    deployed) with, from its ONNX metadata (`default_threshold` for a model that records none)."""
    session = make_session(Path(onnx_path))
    threshold = (read_metadata(Path(onnx_path), session, required=()).get("metrics") or {}).get("threshold")
    inp = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else None for d in inp.shape]
    if shape[1:] != list(images.shape[1:]):
        raise StageError(
            f"{onnx_path} expects input {inp.shape[1:]} but the prepared test images are "
            f"{list(images.shape[1:])}; the two models cannot be compared on the same data."
        )
    out = [
        session.run(None, {inp.name: np.asarray(images[i : i + batch], dtype=np.float32) / 255.0})[0]
        for i in range(0, len(images), batch)
    ]
    probs = np.concatenate(out) if out else np.zeros((0, 0), np.float32)
    return probs, default_threshold if threshold is None else float(threshold)


def comparison_rows(index: pd.DataFrame, champion_manifest: str | Path | None) -> np.ndarray:
    """Test rows usable for a fair comparison: patients the champion never trained or validated on."""
    keep = np.ones(len(index), bool)
    if champion_manifest and Path(champion_manifest).is_file():
        m = read_manifest(champion_manifest, required=("patient", "split"))
        seen = set(m.loc[m["split"].isin(["train", "val"]), "patient"]) - {""}
        keep = ~index["patient"].isin(seen).to_numpy()
    return keep


def unreproducible(root: str | Path, lineage: dict[str, Any]) -> list[str]:
    """Why a release tag made now would not reproduce the model `lineage` describes (empty: it would).

    The tag is HEAD plus what the release commits (release_paths: data version, dvc.lock, parameters,
    uncached outputs, registry records), so the code the model was made with must be HEAD's code: the
    lineage says it was committed (`git_dirty` false) at a commit whose code is HEAD's, the working
    tree's code is still HEAD's (common.git_facts), and `dvc status` is clean (dvc.lock describes the
    files it will be committed with). A lineage without a `code` record (older exports) is not checked.
    """
    root = Path(root)
    code = lineage.get("code")
    if not isinstance(code, dict):
        return []
    why = []
    if code.get("git_dirty") is not False:
        why.append(
            "the code was not committed when the model was exported (lineage git_dirty: "
            f"{json.dumps(code.get('git_dirty'))})"
        )
    commit = str(code.get("git_commit") or "unknown")
    found = common.run_tool(["git", "cat-file", "-e", f"{commit}^{{commit}}"], root, check=False).returncode == 0
    if not found:
        why.append(f"the lineage's git commit {commit[:12]} is not in this repository")
    else:
        changed = git(root, "diff", "--name-only", commit, "HEAD", "--", ".", *common.record_pathspecs(root)).split()
        if changed:
            why.append(
                f"the code changed between the model's commit {commit[:12]} and HEAD: {', '.join(changed[:10])}"
                + (f" and {len(changed) - 10} more" if len(changed) > 10 else "")
            )
    now = common.git_facts(root)
    if now["dirty"]:
        why.append(
            "the working tree's code differs from HEAD (commit it): "
            + ", ".join(now["modified"][:10])
            + (f" and {len(now['modified']) - 10} more" if len(now["modified"]) > 10 else "")
        )
    status = dvc(root, "status", "--json", check=False)
    try:
        stale = sorted(json.loads(status or "{}"))
    except ValueError:
        stale = [status.strip()[-300:] or "dvc status failed"]
    if stale:
        why.append(f"`dvc status` is not clean ({', '.join(stale)}): dvc.lock does not describe the workspace")
    return why


def compare(
    root: str | Path,
    params: Params,
    compare_metric: str,
    margin: float,
    prepared_dir: str | Path = "data/prepared",
    models_dir: str | Path = "models",
    reports_dir: str | Path = "reports",
) -> dict[str, Any]:
    """The promotion decision for the challenger in models/ + reports/ against the registry champion.

    Promote iff the challenger passed the absolute gate AND (no champion, or challenger metric >=
    champion metric - margin on the same test images; for mae and rmse, lower being better, challenger
    <= champion + margin: `judge`). Returns {promote, reasons, champion,
    challenger, comparison}; the metrics of both models are in it whatever the outcome.
    """
    root = Path(root)
    models = root / models_dir
    challenger, exported = _challenger(root / reports_dir, models)
    cur = current(root)
    champion = {"model_id": cur["model_id"] if cur else None, "metrics": None}
    blockers = _gate_blockers(challenger, exported, models)  # the subset of reasons that stop a promotion
    reasons: list[str] = []
    if cur and cur["model_id"] == challenger["model_id"]:
        return {
            "promote": False,
            "reasons": ["challenger is the current champion (same model id); nothing to do"],
            "champion": champion,
            "challenger": challenger,
            "comparison": None,
            "same_model": True,
        }

    comparison = None
    if cur:
        counts, champion["metrics"], shared, problem = _shared_test_metrics(
            root / prepared_dir, root, params, cur, models / "model.onnx" if exported else None
        )
        comparison = {"metric": compare_metric, "margin": margin, **counts}
        if shared is not None:
            comparison["challenger"] = shared
        if problem:
            blockers.append(problem)
        if champion["metrics"] and comparison.get("challenger"):
            a = _value(comparison["challenger"], compare_metric)
            b = _value(champion["metrics"], compare_metric)
            comparison.update(challenger_value=a, champion_value=b)
            better, why = judge(compare_metric, a, b, margin, comparison["n_compared"])
            (reasons if better else blockers).append(why)
    if not blockers:  # a promotion is tagged: the tag must reproduce the model
        blockers += [
            f"a release tag would not reproduce challenger {challenger['model_id']}: {w}"
            for w in unreproducible(root, common.read_json(models / "lineage.json"))
        ]
    promote = not blockers
    reasons = blockers + reasons
    if promote and not cur:
        reasons.append("no champion yet: the first model that passes the gate is promoted")
    return {
        "promote": promote,
        "reasons": reasons,
        "champion": champion,
        "challenger": challenger,
        "comparison": comparison,
    }


def _value(metrics: dict[str, Any], name: str) -> float:
    value = metrics.get(name)
    return float("nan") if value is None else float(value)  # R^2 is None when undefined


def judge(metric: str, challenger: float, champion: float, margin: float, n: int) -> tuple[bool, str]:
    """Whether the challenger is no worse than the champion on `metric` (within `margin`), and the reason,
    naming the direction: for mae and rmse lower is better (challenger <= champion + margin), for every
    other metric higher is better (challenger >= champion - margin). A non-finite challenger value loses."""
    a, b, on = challenger, champion, f"on {n} shared test images"
    if metric in LOWER_IS_BETTER:
        if np.isfinite(a) and a <= b + margin:
            return True, f"challenger {metric} {a:.4f} <= champion {b:.4f} + margin {margin} {on} (lower is better)"
        return False, (
            f"challenger {metric} {a:.4f} is worse than champion {b:.4f}: higher by more than the margin {margin} "
            f"{on} (lower is better)"
        )
    direction = " (higher is better)" if metric == "r2" else ""  # the classification messages stay as they were
    if np.isfinite(a) and a >= b - margin:
        return True, f"challenger {metric} {a:.4f} >= champion {b:.4f} - margin {margin} {on}{direction}"
    return (
        False,
        f"challenger {metric} {a:.4f} is worse than champion {b:.4f} by more than the margin {margin} {on}{direction}",
    )


def _challenger(reports: Path, models: Path) -> tuple[dict[str, Any], bool]:
    """The challenger's {model_id, metrics, gate}, and whether models/ holds its export."""
    from components.model.evaluate import read_record
    from components.release.export import model_id

    gate = common.read_json(reports / "gate.json")
    # The model id is known even when export was refused.
    challenger = {
        "model_id": model_id(common.sha256_file(models / "model.pt")) if (models / "model.pt").is_file() else None,
        "metrics": read_record(reports),
        "gate": gate,
    }
    # A models/model.onnx left by an earlier run must not stand in for this checkpoint.
    exported = (
        (models / "lineage.json").is_file()
        and (models / "model.onnx").is_file()
        and challenger["model_id"] is not None
        and model_id_of(models) == challenger["model_id"]
    )
    return challenger, exported


def _gate_blockers(challenger: dict[str, Any], exported: bool, models: Path) -> list[str]:
    """Why the challenger cannot be promoted whatever the champion: it failed the gate, or was not exported."""
    gate = challenger["gate"]
    if not gate.get("passed"):
        return ["challenger failed the absolute gate: " + "; ".join(gate.get("failed") or gate.get("reasons", []))]
    if not exported:
        return [f"challenger {challenger['model_id']} has no exported model in {models} (export did not run)"]
    return []


def _shared_test_metrics(
    prepared: Path, root: Path, params: Params, cur: dict[str, Any], challenger_onnx: Path | None
) -> tuple[dict[str, int], dict | None, dict | None, str | None]:
    """The champion's and challenger's (if exported) metrics on the test images of patients the champion
    never trained or validated on: (their counts, champion metrics, challenger metrics, why a model
    could not be scored there, or None). Metrics are None when not computed."""
    from components.data.preprocess import load_split

    images, index = load_split(prepared, "test")
    keep = comparison_rows(index, model_dir(root, cur["model_id"]) / "manifest.csv")
    if params.data.regression:
        from components.model.targets import targets

        y = targets(prepared, index, "test")[keep]
    else:
        y = index["label_index"].to_numpy()[keep]
    counts = {
        "n_test": int(len(index)),
        "n_compared": int(keep.sum()),
        "excluded_champion_train_patients": int((~keep).sum()),
    }
    champion_metrics = challenger_metrics = None
    try:
        onnx = champion_onnx(root)
        if onnx is None:
            raise StageError(
                f"champion {cur['model_id']}: its ONNX is neither in the registry nor retrievable "
                f"with dvc get at tag {cur.get('git_tag')}"
            )
        subset = np.asarray(images)[keep]
        champion_metrics = _scored(onnx, subset, y, params)
        if challenger_onnx is not None:
            challenger_metrics = _scored(challenger_onnx, subset, y, params)
    except (StageError, ValueError) as exc:
        return (
            counts,
            champion_metrics,
            challenger_metrics,
            f"cannot compare with champion {cur['model_id']} on the same test data: {exc}",
        )
    return counts, champion_metrics, challenger_metrics, None


def _scored(onnx: str | Path, images: np.ndarray, y: np.ndarray, params: Params) -> dict[str, Any]:
    """One model's test metrics on `images` with truth `y`: a classifier's at its own recorded threshold
    (it may have been chosen on its validation split); a regression's MAE, RMSE and R^2 of its values."""
    from components.model.metrics import compute_metrics

    ev = params.evaluate
    out, threshold = onnx_probabilities(onnx, images, ev.threshold)
    if params.data.regression:
        from components.model.metrics import regression_metrics

        if out.ndim != 2 or out.shape[1] != 1:
            raise StageError(f"{onnx} gives outputs of shape {out.shape}; a regression model gives one value per image")
        return regression_metrics(y, out[:, 0], ev.bootstrap, ev.seed)
    return compute_metrics(y, out, params.data.classes, params.positive_index, threshold, ev.bootstrap, ev.seed)
