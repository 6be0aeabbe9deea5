"""`medtune verify`'s checks of a model's own files: the ONNX file and the checkpoint (every copy on
disk, else the DVC cache or a remote by the md5 dvc.lock gives them at the release tag), and the
manifest copy with its content hash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.audit.lookup import ModelRef, onnx_metadata_id
from components.audit.stores import Store, dvc_object, object_sha256
from components.audit.verify_items import MISMATCH, MISSING, OK, item
from components.common import sha256_bytes, sha256_file
from components.data.manifest import LISTING_COLUMNS, read_manifest_rows


def check_model_file(
    m: ModelRef,
    name: str,
    lock_path: str,
    want: str | None,
    tag: str | None,
    tag_outs: dict[str, str] | None,
    stores: list[tuple[str, Store]],
    kind: str,
) -> list[dict[str, Any]]:
    """Every copy of one of the model's own files (the named ONNX, the model folder, the registry,
    the workspace when it holds this model); with none on disk, the DVC cache or a remote, by the md5
    dvc.lock records at the release tag."""
    if not want:
        return [item(name, kind, MISSING, detail="the lineage records no sha256 for it")]
    items = _copies_on_disk(m, name, want, kind)
    if items:
        return items
    md5 = (tag_outs or {}).get(lock_path)
    obj = dvc_object(stores, md5) if md5 else None
    if obj:
        got = object_sha256(obj[1])
        detail = f"{lock_path} from {obj[0]} (md5 {md5} in dvc.lock at tag {tag})"
        return [item(name, kind, OK if got == want else MISMATCH, obj[1], want, got, detail)]
    return [item(name, kind, MISSING, None, want, None, _not_found(m, lock_path, md5, tag, tag_outs))]


def _copies_on_disk(m: ModelRef, name: str, want: str, kind: str) -> list[dict[str, Any]]:
    paths = [m.onnx_path] if kind == "onnx" and m.onnx_path else []
    paths += [d / name for d in m.file_dirs if (d / name).is_file() and d / name not in paths]
    items = []
    for path in paths:
        got = sha256_file(path)
        detail = ""
        if got != want:
            detail = f"{path} is not the file recorded in {m.lineage_path}"
            other = onnx_metadata_id(path) if kind == "onnx" else None
            detail += f" (its metadata says model_id {other})" if other else ""
        items.append(item(name, kind, OK if got == want else MISMATCH, path, want, got, detail))
    return items


def _not_found(m: ModelRef, lock_path: str, md5: str | None, tag: str | None, tag_outs: dict[str, str] | None) -> str:
    """Why a model file is missing: where it was looked for, and why DVC could not supply it."""
    where = ", ".join(str(d) for d in m.file_dirs)
    return f"not in {where}" + (
        f"; {lock_path} md5 {md5} (dvc.lock at tag {tag}) is not in the DVC cache or any DVC remote"
        if md5
        else "; no release tag with a dvc.lock to find it in DVC"
        if not tag
        else f"; DVC could not read dvc.lock at tag {tag} (see the notes)"
        if tag_outs is None
        else f"; dvc.lock at tag {tag} does not list {lock_path}"
    )


def check_manifest(m: ModelRef, root: Path) -> tuple[list[dict[str, Any]], Path | None]:
    """Every copy of the model's manifest is checked; the first intact one lists the scans."""
    data = m.lineage.get("data") or {}
    want = data.get("manifest_sha256")
    copies = [d / "manifest.csv" for d in m.file_dirs]
    if data.get("manifest_path") and m.lineage_path.parent.resolve() == (root / "models").resolve():
        copies.append(root / str(data["manifest_path"]))  # the workspace model's manifest is data/manifest.csv
    found = [p for p in copies if p.is_file()]
    if not found:
        where = ", ".join(str(c) for c in copies)
        return [item("manifest.csv", "manifest", MISSING, None, want, None, f"no copy in {where}")], None
    items, good = [], []
    for path in found:
        got = sha256_file(path)
        detail = "" if got == want else "the per-image manifest was changed after export"
        items.append(item("manifest.csv", "manifest", OK if got == want else MISMATCH, path, want, got, detail))
        if got == want:
            good.append(path)
    path = (good or found)[0]
    items.append(_content_hash(path, data.get("content_hash")))
    return items, path


def _content_hash(path: Path, want: str | None) -> dict[str, Any]:
    rows = read_manifest_rows(path, LISTING_COLUMNS)
    listing = "".join(f"{r['path']}  {r['sha256']}\n" for r in rows)  # ingest's content_hash, sha256sum format
    got = sha256_bytes(listing.encode())
    detail = "" if got == want else "path+sha256 list of the manifest differs from the recorded one"
    return item("content_hash", "manifest", OK if got == want else MISMATCH, path, want, got, detail)
