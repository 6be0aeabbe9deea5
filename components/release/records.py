"""The registry's records, read as plain files (JSON, JSON lines, `git show`): lineage.json,
registry/releases.jsonl, registry/current.json. The layout is docs/architecture.md's "Registry".

Readers only, no torch, pandas or ONNX: the registry (components.release.registry) writes these
records, and the audit commands (components.audit) read them through here.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from components.common import StageError, read_json

LINEAGE = "lineage.json"
NOT_RECORDED = "not recorded"
HEX_ID = re.compile(r"^[0-9a-f]{4,64}$")


def not_recorded(why: str) -> str:
    """The value of a field that cannot be known: it says so, instead of disappearing."""
    return f"{NOT_RECORDED}: {why}"


def registry_dir(root: str | Path = ".") -> Path:
    return Path(root) / "registry"


def load_lineage(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        lineage = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{path} not found; expected a lineage record written by `medtune export`.") from None
    except json.JSONDecodeError as exc:
        raise StageError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); expected a lineage "
            "record written by `medtune export`."
        ) from None
    if not isinstance(lineage, dict) or not lineage.get("model_id"):
        raise StageError(f"{path}: no 'model_id' in it; expected a lineage record written by `medtune export`.")
    return lineage


def registered_ids(registry: Path) -> list[str]:
    """Model ids with a folder (and lineage) under registry/models/, sorted."""
    models = registry / "models"
    if not models.is_dir():
        return []
    return sorted(p.name for p in models.iterdir() if (p / LINEAGE).is_file())


def read_releases(registry: Path) -> list[dict[str, Any]]:
    """The events of registry/releases.jsonl in file order ([] when there is none yet)."""
    path = registry / "releases.jsonl"
    if not path.is_file():
        return []
    events = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StageError(
                f"{path} line {n} is not valid JSON ({exc.msg}); expected one release event "
                "per line. Restore it from git (git checkout -- registry/releases.jsonl)."
            ) from None
        if not isinstance(event, dict):
            raise StageError(f"{path} line {n} is {type(event).__name__}; expected a JSON object per line.")
        events.append(event)
    return events


def read_current(registry: Path) -> dict[str, Any] | None:
    path = registry / "current.json"
    return read_json(path) if path.is_file() else None


def events_for(events: list[dict[str, Any]], model_id: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("model_id") == model_id]


def previous_model(events: list[dict[str, Any]], model_id: str) -> str | None:
    """The model a model replaced or was compared with: the champion of its first release event,
    else the last model promoted before that event."""
    mine = [i for i, e in enumerate(events) if e.get("model_id") == model_id and e.get("event") != "rollback"]
    if not mine:
        return None
    first = events[mine[0]]
    champ = (first.get("champion") or {}).get("model_id")
    if champ and champ != model_id:
        return champ
    for e in reversed(events[: mine[0]]):
        if e.get("event") in ("promoted", "rollback") and e.get("model_id") not in (None, model_id):
            return e["model_id"]
    return None


def git_show(root: str | Path, rev: str, path: str) -> bytes | None:
    """The bytes of `path` (relative to root) at git revision `rev`, or None."""
    try:
        out = subprocess.run(["git", "show", f"{rev}:./{path}"], cwd=root, capture_output=True, check=False)
    except FileNotFoundError:
        return None
    return out.stdout if out.returncode == 0 else None


def find_id(ref: str, root: Path, registry: Path) -> tuple[str, Path] | None:
    """(model_id, lineage path) for an id or unique prefix: the registry first, then the workspace."""
    ids = registered_ids(registry)
    hits = [i for i in ids if i == ref] or [i for i in ids if i.startswith(ref)]
    if len(hits) > 1:
        raise StageError(
            f"model id prefix {ref!r} is ambiguous in {registry / 'models'}: {hits}; give more characters."
        )
    if hits:
        return hits[0], registry / "models" / hits[0] / LINEAGE
    ws = root / "models" / LINEAGE
    if ws.is_file():
        mid = str(load_lineage(ws)["model_id"])
        if mid.startswith(ref):
            return mid, ws
    return None


def key_metrics(lineage: dict[str, Any] | None, fallback: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metrics `models list` and the release events show: AUROC with its interval, sensitivity,
    specificity; for a regression MAE with its interval, RMSE and R^2."""
    metrics = ((lineage or {}).get("evaluation") or {}).get("metrics") or fallback or {}
    keys = ("auroc", "auroc_ci", "sensitivity", "specificity", "mae", "mae_ci", "rmse", "r2")
    return {k: metrics.get(k) for k in keys if k in metrics}
