"""The model registry: which model is the champion, every promotion/rejection, and how to audit it.

Layout (git-tracked, small, append-only; see docs/architecture.md "Registry"):

    registry/models/<model_id>/{lineage.json, model_card.md, manifest.csv}   # + model.onnx and model.pt
                                                                           #   (git-ignored, in the DVC
                                                                           #   remote under the tag)
    registry/releases.jsonl      one JSON line per event: promoted | rejected | rollback | failed
    registry/current.json        {model_id, git_tag} of the champion

Promotion is one git commit (what defines the model: data/raw.dvc, dvc.lock, params.yaml, .dvc/config
with the remote, the outputs DVC does not cache; plus the model's registry folder, the release line,
current.json) made after `dvc push`, then a tag `<prefix><model_id>`, then the batches are archived.
A clone checked out at the tag therefore reproduces the model: after `dvc pull`, `dvc status` is clean,
`dvc repro` has nothing to do and `medtune verify` passes. compare() promotes only a model whose code
is the committed code (the lineage's `git_dirty`, `unreproducible()`), since the tag holds HEAD's code.
The whole release is written to PENDING before its first step, so `recover()` (run first by every
retrain) finishes a release a crashed run left half-made, without retraining: the tag and the archive
after the commit, or every step again before it (registry files back to HEAD first). Only when the
pipeline outputs changed since is the release dropped, its batches retrained.

Comparison "on the same test data": the champion's ONNX and the challenger's ONNX are both run with
ONNX Runtime on the challenger's prepared test split, minus the images of patients the champion was
trained or validated on (from the champion's own manifest copy), because the patient-level split is
recomputed when data is added and those images would flatter the champion.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from components import common
from components.common import StageError, dvc, git  # registry.git/registry.dvc: callers use these names
from components.model import warm_start
from components.params import Params
from components.release.records import (
    HEX_ID,
    LINEAGE,
    events_for,
    find_id,
    key_metrics,
    load_lineage,
    read_current,
    read_releases,
    registered_ids,
    registry_dir,
)

log = logging.getLogger("medtune.registry")

REGISTRY = "registry"
MODEL_FILES = ("lineage.json", "model_card.md")  # copied from models/; manifest.csv from data/
WEIGHTS = warm_start.WEIGHTS  # models/model.pt, kept beside the ONNX for the next retrain's warm start
MODEL_BINARIES = ("*.onnx", "*.pt")  # in the registry folder but git-ignored: DVC holds them at the tag
# The audit report (`medtune report`) the retrain flow writes beside a promoted model's records: git-ignored
# too, since it shows scans (as reports/augment_preview.png does, which no release commits); rebuilt from the tag.
REPORT = "report.html"
# "failed": a retrain run whose pipeline failed after its batches were appended (no model; model_id None).
EVENTS = ("promoted", "rejected", "rollback", "failed")

# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


def current(root: str | Path = ".") -> dict[str, Any] | None:
    """The champion `{model_id, git_tag}`, or None before the first promotion."""
    return read_current(registry_dir(root))


def releases(root: str | Path = ".") -> list[dict[str, Any]]:
    """Every release event, oldest first (the audit module's reader: it names a corrupt line)."""
    return read_releases(registry_dir(root))


def record_release(root: str | Path, record: dict[str, Any]) -> dict[str, Any]:
    """Append one event to releases.jsonl (rewritten atomically; earlier lines byte-identical)."""
    required = ("event", "model_id", "trigger")
    missing = [k for k in required if k not in record]
    if missing or record["event"] not in EVENTS:
        raise ValueError(
            f"release record {record!r} is invalid; expected keys {list(required)} and event "
            f"one of {', '.join(EVENTS)}."
        )
    record = {"time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **record}
    path = registry_dir(root) / "releases.jsonl"
    old = path.read_text() if path.is_file() else ""
    common.write_text(path, old + json.dumps(record, sort_keys=True, default=common._json_default) + "\n")
    return record


def set_current(root: str | Path, model_id: str, git_tag: str | None) -> Path:
    return common.write_json(registry_dir(root) / "current.json", {"model_id": model_id, "git_tag": git_tag})


def model_dir(root: str | Path, model_id: str) -> Path:
    return registry_dir(root) / "models" / model_id


def store_model(
    root: str | Path, model_id: str, models_dir: str | Path = "models", manifest_csv: str | Path = "data/manifest.csv"
) -> Path:
    """Copy a model's lineage, card and manifest (and ONNX, git-ignored) into the registry."""
    root = Path(root)
    dest = model_dir(root, model_id)
    models_dir = root / models_dir
    lineage = common.read_json(models_dir / "lineage.json")
    if lineage.get("model_id") != model_id:
        raise StageError(f"{models_dir / 'lineage.json'}: model_id {lineage.get('model_id')!r}; expected {model_id!r}.")
    sources = {name: models_dir / name for name in MODEL_FILES}
    sources["manifest.csv"] = root / manifest_csv
    sources["model.onnx"] = models_dir / "model.onnx"
    sources[WEIGHTS] = models_dir / WEIGHTS  # what a warm start of the next retrain loads (train.init_from)
    for name, src in sources.items():
        if not src.is_file():
            raise StageError(f"{src} not found; expected the export stage's output for model {model_id}.")
        with common.atomic_path(dest / name) as tmp:
            shutil.copyfile(src, tmp)
    # Models are large and live in DVC (pull them at the model's tag); only records go to git.
    ignore = registry_dir(root) / ".gitignore"
    lines = (
        ignore.read_text().splitlines()
        if ignore.is_file()
        else ["# model files live in the DVC remote: git checkout <tag> && dvc pull"]
    )
    missing = [p for p in (*MODEL_BINARIES, REPORT) if p not in lines]
    if missing:
        common.write_text(ignore, "\n".join(lines + missing) + "\n")
    return dest


def model_id_of(models_dir: str | Path = "models") -> str:
    return str(common.read_json(Path(models_dir) / "lineage.json")["model_id"])


def champion_checkpoint(root: str | Path = ".") -> Path | None:
    """The champion's model.pt (what a warm start loads), fetched from the DVC remote at its tag if the
    registry copy is missing (a champion promoted before the registry kept it, or a fresh clone)."""
    cur = current(root)
    if not cur:
        return None
    return warm_start.fetch(root, cur["model_id"], cur.get("git_tag"))


def warm_start_plan(root: str | Path, params: Params) -> dict[str, Any]:
    """What the next retrain starts from: `{init_from, model_id, reason}`. init_from is the champion's
    model.pt sha256 when `retrain.warm_start` is on and the champion's task, classes, input shape, backbone
    and ensemble size match `params`; else None (a cold start from ImageNet) and `reason` says why."""
    from components.model.models import BACKBONES, arch_of  # torch: only when a retrain plans its start

    cur = current(root)
    if not params.retrain.warm_start:
        return {"init_from": None, "model_id": None, "reason": "cold start: retrain.warm_start is false"}
    if not cur:
        return {"init_from": None, "model_id": None, "reason": "cold start: no champion yet"}
    mid, tp, pp = cur["model_id"], params.train, params.preprocess
    if tp.backbone not in BACKBONES:
        return {
            "init_from": None,
            "model_id": mid,
            "reason": f"cold start: train.backbone is a checkpoint path ({tp.backbone}), a starting point of its own",
        }
    try:
        path = champion_checkpoint(root)
        sha = common.sha256_file(path)
        if not sha.startswith(mid):
            raise StageError(
                f"{path}: sha256 {sha[:12]}... is not champion {mid}'s (a model id is the first 12 "
                "hex digits of its model.pt's sha256)"
            )
        ckpt = warm_start.read_checkpoint(path, sha)
    except StageError as exc:
        return {"init_from": None, "model_id": mid, "reason": f"cold start: champion {mid}'s weights: {exc}"}
    classes = [] if params.data.regression else params.data.classes  # a regression checkpoint records none
    wrong = warm_start.mismatches(
        ckpt, classes, pp.channels, pp.image_size, arch_of(tp.backbone), tp.ensemble, params.data.task
    )
    if wrong:
        return {
            "init_from": None,
            "model_id": mid,
            "reason": f"cold start: champion {mid} does not match the parameters: its " + "; ".join(wrong),
        }
    return {"init_from": sha, "model_id": mid, "reason": f"warm start from champion {mid} (sha256 {sha})"}


def champion_onnx(root: str | Path = ".") -> Path | None:
    """The champion's ONNX file, fetched from the DVC remote at its tag if the registry copy is missing."""
    root = Path(root)
    cur = current(root)
    if not cur:
        return None
    path = model_dir(root, cur["model_id"]) / "model.onnx"
    if not path.is_file() and cur.get("git_tag"):
        with common.atomic_path(path) as tmp:
            tmp.unlink()
            dvc(root, "get", ".", "models/model.onnx", "--rev", cur["git_tag"], "-o", str(tmp))
    return path if path.is_file() else None


def _in_git(root: Path) -> bool:
    return git(root, "rev-parse", "--is-inside-work-tree", check=False) == "true"


def rollback(
    model_id: str,
    root: str | Path = ".",
    reason: str | None = None,
    trigger: str = "manual",
    flow_run_id: str | None = None,
    commit: bool = True,
) -> dict[str, Any]:
    """Make an earlier promoted model the current one, recorded as a `rollback` release event.

    In the event, `champion` is the model being replaced and `challenger` the one restored. The
    event and current.json are written with components.release.registry and, inside a git repository,
    committed (registry.recover() would otherwise undo an uncommitted change on the next retrain).
    """
    root = Path(root)
    registry = registry_dir(root)
    found = find_id(model_id, root, registry) if HEX_ID.match(model_id) else None
    if found is None or found[1].parent.parent != registry / "models":
        raise StageError(
            f"model {model_id!r} is not in {registry / 'models'} (registered: "
            f"{', '.join(registered_ids(registry)) or 'none'}); only a promoted model can be rolled back to."
        )
    mid = found[0]
    events = read_releases(registry)
    promoted = [e for e in events_for(events, mid) if e.get("event") == "promoted"]
    if not promoted:
        kinds = [e.get("event") for e in events_for(events, mid)] or ["none"]
        raise StageError(
            f"model {mid} was never promoted (its events in {registry / 'releases.jsonl'}: "
            f"{kinds}); only a model that was promoted once can be rolled back to."
        )
    current = read_current(registry) or {}
    if current.get("model_id") == mid:
        raise StageError(f"model {mid} is already the current model ({registry / 'current.json'}); nothing to do.")
    lineage = load_lineage(found[1])
    prev_id = current.get("model_id")
    prev_path = registry / "models" / str(prev_id) / LINEAGE
    prev_lineage = load_lineage(prev_path) if prev_id and prev_path.is_file() else None
    git_tag = next((e.get("git_tag") for e in reversed(promoted) if e.get("git_tag")), None)
    in_git = commit and _in_git(root)
    if in_git and git(root, "status", "--porcelain", "--", "registry/releases.jsonl", "registry/current.json"):
        raise StageError(
            f"{registry}/releases.jsonl or current.json has uncommitted changes; commit or restore "
            "them first (git status registry/), so the rollback is one clean commit."
        )
    record = record_release(
        root,
        {
            "event": "rollback",
            "model_id": mid,
            "trigger": trigger,
            "flow_run_id": flow_run_id,
            "champion": {"model_id": prev_id, "metrics": key_metrics(prev_lineage) if prev_lineage else None},
            "challenger": {"model_id": mid, "metrics": key_metrics(lineage)},
            "reasons": [reason or f"manual rollback from {prev_id} to {mid}"],
            "git_tag": git_tag,
            "data_version": (lineage.get("data") or {}).get("data_version"),
        },
    )
    set_current(root, mid, git_tag)
    if in_git:
        paths = ["registry/releases.jsonl", "registry/current.json"]
        git(root, "add", "--", *paths)
        git(root, "commit", "-q", "-m", f"medtune rollback: current model {mid} (was {prev_id})", "--", *paths)
        record["git_commit"] = git(root, "rev-parse", "HEAD")
    return record
