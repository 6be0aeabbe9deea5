"""MODEL, as the audit commands take it, resolved to its lineage: an ONNX file, a lineage.json, a model
directory, a model id from the registry (or a unique prefix of >= 4 characters), or `current`.

`medtune trace MODEL` (components/audit/trace.py) and `medtune verify MODEL` (components/audit/verify.py)
start here. Everything read is a plain file, so neither command imports torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.common import StageError, sha256_file
from components.release.onnx_runtime import read_metadata
from components.release.records import (
    HEX_ID,
    LINEAGE,
    find_id,
    load_lineage,
    read_current,
    registered_ids,
    registry_dir,
)


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
    try:
        return str(read_metadata(path, required=("model_id",))["model_id"])
    except StageError:  # not an ONNX file, or not a medtune one: the caller says what was expected
        return None


def _by_onnx_hash(sha: str, registry: Path) -> str | None:
    for mid in registered_ids(registry):
        try:
            if load_lineage(registry / "models" / mid / LINEAGE).get("onnx_sha256") == sha:
                return mid
        except StageError:
            continue
    return None


def _ref(
    mid: str,
    lineage_path: Path,
    how: str,
    root: Path,
    registry: Path,
    onnx_path: Path | None = None,
    notes: Sequence[str] = (),
) -> ModelRef:
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
    return ModelRef(
        mid,
        lineage,
        lineage_path,
        how,
        onnx_path,
        reg if (reg / LINEAGE).is_file() else None,
        tuple(dirs),
        tuple(notes),
    )


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
            raise StageError(
                f"{path} holds no {LINEAGE}; expected a model directory written by `medtune export` "
                f"(models/) or a registry entry ({registry / 'models' / '<model_id>'})."
            )
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
            raise StageError(
                f"{registry / 'current.json'} not found or empty; no model has been promoted yet "
                "(`medtune models list` shows every model)."
            )
        text = str(current["model_id"])
    if not HEX_ID.match(text):
        raise StageError(
            f"MODEL {text!r} is not a file, a directory, `current` or a model id (hex); expected e.g. "
            "models/model.onnx, models/, or an id from `medtune models list`."
        )
    found = find_id(text, root, registry)
    if found is None:
        known = registered_ids(registry)
        raise StageError(
            f"model {text!r} not found in {registry / 'models'} (registered: "
            f"{', '.join(known[:10]) or 'none'}{' ...' if len(known) > 10 else ''}) nor in "
            f"{root / 'models' / LINEAGE}; `medtune models list` shows every model."
        )
    mid, lineage_path = found
    return _ref(mid, lineage_path, f"model id {text}", root, registry)


def _resolve_onnx(path: Path, root: Path, registry: Path, by_content: bool) -> ModelRef:
    sha = sha256_file(path)
    beside = path.parent / LINEAGE
    claim = load_lineage(beside) if beside.is_file() else None
    if claim is not None and (claim.get("onnx_sha256") == sha or not by_content):
        return _ref(
            str(claim["model_id"]), beside, f"ONNX file {path} (lineage beside it)", root, registry, onnx_path=path
        )
    notes = []
    if claim is not None:
        notes.append(
            f"{beside} describes model {claim['model_id']}, whose ONNX sha256 is "
            f"{str(claim.get('onnx_sha256'))[:12]}..., not this file ({sha[:12]}...)"
        )
    mid = _by_onnx_hash(sha, registry)
    if mid:
        return _ref(
            mid,
            registry / "models" / mid / LINEAGE,
            f"ONNX file {path} (sha256 found in the registry)",
            root,
            registry,
            onnx_path=path,
            notes=notes,
        )
    meta_id = onnx_metadata_id(path)
    if meta_id:
        found = find_id(meta_id, root, registry)
        if found:
            notes.append(
                f"{path} is not byte-identical to the ONNX file recorded for model {meta_id}; "
                "identified by its metadata model_id (`medtune verify` checks it)"
            )
            return _ref(
                found[0], found[1], f"ONNX file {path} (metadata model_id)", root, registry, onnx_path=path, notes=notes
            )
    raise StageError(
        f"{path}: no lineage found: no {LINEAGE} beside it describes it, its sha256 {sha[:12]}... is "
        f"in no lineage under {registry / 'models'}, and its ONNX metadata gives "
        f"{'model_id ' + meta_id + ' (unknown)' if meta_id else 'no model_id'}; expected a model "
        "exported by `medtune export`."
    )


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=".", help="project root: models/, data/, dvc.lock, .dvc/ (default: .)")
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON document")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
