"""The audit trail: find any model's lineage, read the registry, list every model, roll back.

    medtune models list                       # every model produced or promoted; the current one marked
    medtune models list --json
    medtune models rollback 3f2a9c1e0b7d --reason "new model misses small lesions"

`medtune trace MODEL` (components/trace.py) and `medtune verify MODEL` (components/verify.py) build
on the look-ups here. MODEL is an ONNX file, a model directory holding `lineage.json` (`models/`,
`registry/models/<id>/`), a model id from the registry (or a unique prefix of >= 4 characters),
or `current`. The registry layout is the one in docs/architecture.md; everything here reads plain
files (JSON, CSV, YAML, `git show`) and never imports torch, so it stays fast.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.common import StageError, git, read_json, run_cli, sha256_file

LINEAGE = "lineage.json"
NOT_RECORDED = "not recorded"
_HEX = re.compile(r"^[0-9a-f]{4,64}$")


def not_recorded(why: str) -> str:
    """The value of a field that cannot be known: it says so, instead of disappearing."""
    return f"{NOT_RECORDED}: {why}"


def registry_dir(root: str | Path = ".") -> Path:
    return Path(root) / "registry"


# ---------------------------------------------------------------------------------------------
# Registry records (read directly per docs/architecture.md)
# ---------------------------------------------------------------------------------------------

def load_lineage(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        lineage = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{path} not found; expected a lineage record written by `medtune export`.") from None
    except json.JSONDecodeError as exc:
        raise StageError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); expected a lineage "
                         "record written by `medtune export`.") from None
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
            raise StageError(f"{path} line {n} is not valid JSON ({exc.msg}); expected one release event "
                             "per line. Restore it from git (git checkout -- registry/releases.jsonl).") from None
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
    for e in reversed(events[:mine[0]]):
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


# ---------------------------------------------------------------------------------------------
# Resolving MODEL to its lineage
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelRef:
    """A model and where its records are. `file_dirs`: folders whose model.onnx / model.pt are
    this model's files (first the one named by the user, then the registry, then the workspace
    if its lineage names the same model)."""

    model_id: str
    lineage: dict[str, Any]
    lineage_path: Path
    how: str
    onnx_path: Path | None = None
    registry_path: Path | None = None
    file_dirs: tuple[Path, ...] = ()
    notes: tuple[str, ...] = field(default=())


def onnx_metadata_id(path: Path) -> str | None:
    """The model_id in an ONNX file's metadata; None when it is not an ONNX file (or has none)."""
    import onnx  # only for an ONNX file with no lineage found by its hash (about 0.3 s)

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not an ONNX file: the caller says what was expected
        return None
    return {p.key: p.value for p in proto.metadata_props}.get("model_id")


def _find_id(ref: str, root: Path, registry: Path) -> tuple[str, Path] | None:
    """(model_id, lineage path) for an id or unique prefix: the registry first, then the workspace."""
    ids = registered_ids(registry)
    hits = [i for i in ids if i == ref] or [i for i in ids if i.startswith(ref)]
    if len(hits) > 1:
        raise StageError(f"model id prefix {ref!r} is ambiguous in {registry / 'models'}: {hits}; give more characters.")
    if hits:
        return hits[0], registry / "models" / hits[0] / LINEAGE
    ws = root / "models" / LINEAGE
    if ws.is_file():
        mid = str(load_lineage(ws)["model_id"])
        if mid.startswith(ref):
            return mid, ws
    return None


def _by_onnx_hash(sha: str, registry: Path) -> str | None:
    for mid in registered_ids(registry):
        try:
            if load_lineage(registry / "models" / mid / LINEAGE).get("onnx_sha256") == sha:
                return mid
        except StageError:
            continue
    return None


def _ref(mid: str, lineage_path: Path, how: str, root: Path, registry: Path, onnx_path: Path | None = None,
         notes: Sequence[str] = ()) -> ModelRef:
    lineage = load_lineage(lineage_path)
    reg = registry / "models" / mid
    dirs = [lineage_path.parent]
    if (reg / LINEAGE).is_file() and reg.resolve() != lineage_path.parent.resolve():
        dirs.append(reg)
    ws = root / "models"
    if ws.resolve() not in {d.resolve() for d in dirs} and (ws / LINEAGE).is_file():
        try:
            if load_lineage(ws / LINEAGE).get("model_id") == mid:
                dirs.append(ws)
        except StageError:
            pass
    return ModelRef(mid, lineage, lineage_path, how, onnx_path, reg if (reg / LINEAGE).is_file() else None,
                    tuple(dirs), tuple(notes))


def resolve_model(ref: str | Path, root: str | Path = ".", by_content: bool = True) -> ModelRef:
    """Find the lineage of MODEL (an ONNX file, a lineage.json, a model directory, a model id,
    a unique id prefix, or `current`).

    An ONNX file is identified by its sha256 (`by_content`, what `trace` wants: the record of the
    model this file *is*); with `by_content=False` (what `verify` wants) the lineage.json beside
    the file is the claim the file is checked against.
    """
    root = Path(root)
    registry = registry_dir(root)
    text = str(ref)
    path = Path(text)
    if path.is_dir():
        if not (path / LINEAGE).is_file():
            raise StageError(f"{path} holds no {LINEAGE}; expected a model directory written by `medtune export` "
                             f"(models/) or a registry entry ({registry / 'models' / '<model_id>'}).")
        lineage = load_lineage(path / LINEAGE)
        return _ref(str(lineage["model_id"]), path / LINEAGE, f"model directory {path}", root, registry)
    if path.is_file() and path.suffix == ".json":
        lineage = load_lineage(path)
        return _ref(str(lineage["model_id"]), path, f"lineage file {path}", root, registry)
    if path.is_file():
        return _resolve_onnx(path, root, registry, by_content)
    if text == "current":
        current = read_current(registry)
        if not current or not current.get("model_id"):
            raise StageError(f"{registry / 'current.json'} not found or empty; no model has been promoted yet "
                             "(`medtune models list` shows every model).")
        text = str(current["model_id"])
    if not _HEX.match(text):
        raise StageError(f"MODEL {text!r} is not a file, a directory, `current` or a model id (hex); expected e.g. "
                         "models/model.onnx, models/, or an id from `medtune models list`.")
    found = _find_id(text, root, registry)
    if found is None:
        known = registered_ids(registry)
        raise StageError(f"model {text!r} not found in {registry / 'models'} (registered: "
                         f"{', '.join(known[:10]) or 'none'}{' ...' if len(known) > 10 else ''}) nor in "
                         f"{root / 'models' / LINEAGE}; `medtune models list` shows every model.")
    mid, lineage_path = found
    return _ref(mid, lineage_path, f"model id {text}", root, registry)


def _resolve_onnx(path: Path, root: Path, registry: Path, by_content: bool) -> ModelRef:
    sha = sha256_file(path)
    beside = path.parent / LINEAGE
    claim = load_lineage(beside) if beside.is_file() else None
    if claim is not None and (claim.get("onnx_sha256") == sha or not by_content):
        return _ref(str(claim["model_id"]), beside, f"ONNX file {path} (lineage beside it)", root, registry,
                    onnx_path=path)
    notes = []
    if claim is not None:
        notes.append(f"{beside} describes model {claim['model_id']}, whose ONNX sha256 is "
                     f"{str(claim.get('onnx_sha256'))[:12]}..., not this file ({sha[:12]}...)")
    mid = _by_onnx_hash(sha, registry)
    if mid:
        return _ref(mid, registry / "models" / mid / LINEAGE, f"ONNX file {path} (sha256 found in the registry)",
                    root, registry, onnx_path=path, notes=notes)
    meta_id = onnx_metadata_id(path)
    if meta_id:
        found = _find_id(meta_id, root, registry)
        if found:
            notes.append(f"{path} is not byte-identical to the ONNX file recorded for model {meta_id}; "
                         "identified by its metadata model_id (`medtune verify` checks it)")
            return _ref(found[0], found[1], f"ONNX file {path} (metadata model_id)", root, registry,
                        onnx_path=path, notes=notes)
    raise StageError(f"{path}: no lineage found: no {LINEAGE} beside it describes it, its sha256 {sha[:12]}... is "
                     f"in no lineage under {registry / 'models'}, and its ONNX metadata gives "
                     f"{'model_id ' + meta_id + ' (unknown)' if meta_id else 'no model_id'}; expected a model "
                     "exported by `medtune export`.")


# ---------------------------------------------------------------------------------------------
# models list / rollback
# ---------------------------------------------------------------------------------------------

def _key_metrics(lineage: dict[str, Any] | None, fallback: dict[str, Any] | None = None) -> dict[str, Any]:
    metrics = ((lineage or {}).get("evaluation") or {}).get("metrics") or fallback or {}
    return {k: metrics.get(k) for k in ("auroc", "auroc_ci", "sensitivity", "specificity") if k in metrics}


def list_models(root: str | Path = ".") -> list[dict[str, Any]]:
    """Every model the registry knows (registered, or named by a release event) plus the
    workspace's exported model: id, date, data version, key metrics, gate, status, current."""
    root = Path(root)
    registry = registry_dir(root)
    events = read_releases(registry)
    current = (read_current(registry) or {}).get("model_id")
    order: list[str] = []
    for mid in [e.get("model_id") for e in events] + registered_ids(registry):
        if mid and mid != "none" and mid not in order:
            order.append(mid)
    ws_lineage = None
    if (root / "models" / LINEAGE).is_file():
        ws_lineage = load_lineage(root / "models" / LINEAGE)
        if ws_lineage["model_id"] not in order:
            order.append(str(ws_lineage["model_id"]))
    rows = []
    for mid in order:
        lineage_path = registry / "models" / mid / LINEAGE
        lineage = load_lineage(lineage_path) if lineage_path.is_file() else (
            ws_lineage if ws_lineage and ws_lineage["model_id"] == mid else None)
        mine = events_for(events, mid)
        kinds = [e.get("event") for e in mine]
        status = ("promoted" if "promoted" in kinds else "rejected" if "rejected" in kinds
                  else "rolled back to" if "rollback" in kinds else "not released")
        first = next((e for e in mine if e.get("event") == "promoted"), mine[0] if mine else {})
        as_challenger = (first.get("challenger") or {}).get("metrics") if first else None
        rows.append({
            "model_id": mid,
            "date": first.get("time") or not_recorded("no release event"),
            "data_version": ((lineage or {}).get("data") or {}).get("data_version") or first.get("data_version")
            or not_recorded("no lineage"),
            "metrics": _key_metrics(lineage, as_challenger),
            "gate": ((((lineage or {}).get("evaluation") or {}).get("gate")
                      or ((first.get("challenger") or {}).get("gate") if first else None) or {}).get("passed")),
            "status": status,
            "events": kinds,
            "git_tag": next((e.get("git_tag") for e in reversed(mine) if e.get("git_tag")), None),
            "current": mid == current,
            "lineage": str(lineage_path if lineage_path.is_file() else root / "models" / LINEAGE) if lineage else None,
        })
    return rows


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else "-" if v is None else str(v)


def render_models(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no models yet: run `dvc repro` (or the retraining flow) to produce one."
    head = f"  {'model_id':<12}  {'date':<25}  {'data_version':<14}  {'auroc [95% CI]':<22}  {'sens':>5}  " \
           f"{'spec':>5}  {'gate':<6}  status"
    lines = [head]
    for r in rows:
        m = r["metrics"]
        ci = m.get("auroc_ci") or [None, None]
        auroc = f"{_fmt(m.get('auroc'))} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if "auroc" in m else "-"
        date = r["date"] if not str(r["date"]).startswith(NOT_RECORDED) else "-"
        dv = str(r["data_version"])
        dv = "-" if dv.startswith(NOT_RECORDED) else dv[:14]
        gate = {True: "passed", False: "failed"}.get(r["gate"], "-")
        status = r["status"] + (f" ({r['git_tag']})" if r["git_tag"] else "")
        lines.append(f"{'*' if r['current'] else ' '} {r['model_id']:<12}  {date:<25}  {dv:<14}  {auroc:<22}  "
                     f"{_fmt(m.get('sensitivity')):>5}  {_fmt(m.get('specificity')):>5}  {gate:<6}  {status}")
    lines.append("* = current (registry/current.json)")
    return "\n".join(lines)


def _in_git(root: Path) -> bool:
    return git(root, "rev-parse", "--is-inside-work-tree", check=False) == "true"


def rollback(model_id: str, root: str | Path = ".", reason: str | None = None, trigger: str = "manual",
             flow_run_id: str | None = None, commit: bool = True) -> dict[str, Any]:
    """Make an earlier promoted model the current one, recorded as a `rollback` release event.

    In the event, `champion` is the model being replaced and `challenger` the one restored. The
    event and current.json are written with components.registry and, inside a git repository,
    committed (registry.recover() would otherwise undo an uncommitted change on the next retrain).
    """
    from components import registry as reg  # pandas/numpy: only this command pays for them

    root = Path(root)
    registry = registry_dir(root)
    found = _find_id(model_id, root, registry) if _HEX.match(model_id) else None
    if found is None or found[1].parent.parent != registry / "models":
        raise StageError(f"model {model_id!r} is not in {registry / 'models'} (registered: "
                         f"{', '.join(registered_ids(registry)) or 'none'}); only a promoted model can be rolled back to.")
    mid = found[0]
    events = read_releases(registry)
    promoted = [e for e in events_for(events, mid) if e.get("event") == "promoted"]
    if not promoted:
        kinds = [e.get("event") for e in events_for(events, mid)] or ["none"]
        raise StageError(f"model {mid} was never promoted (its events in {registry / 'releases.jsonl'}: "
                         f"{kinds}); only a model that was promoted once can be rolled back to.")
    current = read_current(registry) or {}
    if current.get("model_id") == mid:
        raise StageError(f"model {mid} is already the current model ({registry / 'current.json'}); nothing to do.")
    lineage = load_lineage(found[1])
    prev_id = current.get("model_id")
    prev_path = registry / "models" / str(prev_id) / LINEAGE
    prev_lineage = load_lineage(prev_path) if prev_id and prev_path.is_file() else None
    git_tag = next((e.get("git_tag") for e in reversed(promoted) if e.get("git_tag")), None)
    git = commit and _in_git(root)
    if git and reg.git(root, "status", "--porcelain", "--", "registry/releases.jsonl", "registry/current.json"):
        raise StageError(f"{registry}/releases.jsonl or current.json has uncommitted changes; commit or restore "
                         "them first (git status registry/), so the rollback is one clean commit.")
    record = reg.record_release(root, {
        "event": "rollback", "model_id": mid, "trigger": trigger, "flow_run_id": flow_run_id,
        "champion": {"model_id": prev_id, "metrics": _key_metrics(prev_lineage) if prev_lineage else None},
        "challenger": {"model_id": mid, "metrics": _key_metrics(lineage)},
        "reasons": [reason or f"manual rollback from {prev_id} to {mid}"],
        "git_tag": git_tag, "data_version": (lineage.get("data") or {}).get("data_version")})
    reg.set_current(root, mid, git_tag)
    if git:
        paths = ["registry/releases.jsonl", "registry/current.json"]
        reg.git(root, "add", "--", *paths)
        reg.git(root, "commit", "-q", "-m", f"medtune rollback: current model {mid} (was {prev_id})", "--", *paths)
        record["git_commit"] = reg.git(root, "rev-parse", "HEAD")
    return record


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=".", help="project root: models/, data/, dvc.lock, .dvc/ (default: .)")
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON document")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medtune models", description="Every model produced and promoted; "
                                     "roll back to an earlier promoted model (recorded in registry/releases.jsonl).")
    sub = parser.add_subparsers(dest="action", required=True)
    add_common_args(sub.add_parser("list", help="every model: id, date, data version, key metrics, gate, current"))
    rb = sub.add_parser("rollback", help="make an earlier promoted model current again, and record it")
    rb.add_argument("model_id", help="id (or unique prefix) of a model promoted before")
    rb.add_argument("--reason", default=None, help="why (stored in the rollback event)")
    rb.add_argument("--no-commit", action="store_true", help="write the registry files but do not git commit them")
    add_common_args(rb)

    def run(args: argparse.Namespace) -> int:
        if args.action == "list":
            rows = list_models(args.root)
            print(json.dumps(rows, indent=2) if args.json else render_models(rows))
            return 0
        event = rollback(args.model_id, args.root, args.reason, commit=not args.no_commit)
        if args.json:
            print(json.dumps(event, indent=2, sort_keys=True))
        else:
            print(f"rolled back: current model is now {event['model_id']} (was {event['champion']['model_id']}); "
                  f"recorded in {registry_dir(args.root) / 'releases.jsonl'}"
                  + (f", commit {event['git_commit'][:12]}" if event.get("git_commit") else ""))
        return 0

    return run_cli(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
