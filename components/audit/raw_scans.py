"""`medtune verify`'s check of every raw scan of a model's data version, and of that version's DVC listing.

Scans come from the workspace when `data/raw.dvc` still names the model's data version and the raw
folder exists (a changed or missing file there is then a finding), otherwise from the DVC cache or
a DVC remote, by the md5 the data version's listing (`<data_version>.dir`) gives each scan.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from components.audit.lookup import ModelRef
from components.audit.stores import RemoteObject, Store, dvc_object, object_sha256, read_listing
from components.audit.verify_items import MISMATCH, MISSING, OK, item
from components.common import dvc_data_version, sha256_file
from components.data.manifest import LISTING_COLUMNS, read_manifest_rows


def check_scans(m: ModelRef, root: Path, manifest: Path, stores: list[tuple[str, Store]]) -> list[dict[str, Any]]:
    """The data version's listing (when DVC holds it) and every scan `manifest` lists, each with its source."""
    rows = read_manifest_rows(manifest, LISTING_COLUMNS)
    version = str((m.lineage.get("data") or {}).get("data_version") or "untracked")
    raw_dir = root / str(
        (((m.lineage.get("code") or {}).get("params") or {}).get("data") or {}).get("raw_dir", "data/raw")
    )
    # A fresh clone that has not pulled has no raw folder at all: its scans come from the cache or a remote.
    workspace_claims = version == "untracked" or (dvc_data_version(raw_dir) == version and raw_dir.is_dir())
    items, listing = [], None
    if version != "untracked":
        obj = dvc_object(stores, version)
        if obj is None and not workspace_claims:
            return [_version_missing(version, raw_dir)]
        if obj is not None:
            version_item, listing = _version_listing(version, obj)
            items.append(version_item)
    for r in rows:
        if workspace_claims:
            items.append(_workspace_scan(raw_dir, version, r["path"], r["sha256"]))
        else:
            items.append(_stored_scan(stores, listing or {}, raw_dir, version, r["path"], r["sha256"]))
    source = f"workspace {raw_dir}" if workspace_claims else "DVC cache/remote"
    for it in items:
        it.setdefault("source", source)
    return items


def _version_missing(version: str, raw_dir: Path) -> dict[str, Any]:
    return item(
        version,
        "data version",
        MISSING,
        None,
        version,
        None,
        f"the listing of data version {version} is not in the DVC cache or any DVC remote, and "
        f"{raw_dir} does not hold that version (push it from a workspace that has it)",
    )


def _version_listing(version: str, obj: tuple[str, Path | RemoteObject]) -> tuple[dict[str, Any], dict[str, str]]:
    """(the listing's own check: it hashes to the version's name, {relpath: md5} it gives the scans)."""
    blob = obj[1].read_bytes()
    got = hashlib.md5(blob).hexdigest() + ".dir"
    status = OK if got == version else MISMATCH
    return item(version, "data version", status, obj[1], version, got, f"DVC listing from {obj[0]}"), read_listing(blob)


def _workspace_scan(raw_dir: Path, version: str, rel: str, want: str) -> dict[str, Any]:
    """A scan of the workspace raw folder, which data/raw.dvc says holds the model's data version."""
    ws = raw_dir / rel
    if not ws.is_file():
        why = f"missing from {raw_dir}, which {raw_dir}.dvc says holds data version {version} (`dvc checkout` restores it)"
        return item(rel, "scan", MISSING, ws, want, None, why)
    got = sha256_file(ws)
    detail = "" if got == want else f"changed in {raw_dir} since ingest"
    return item(rel, "scan", OK if got == want else MISMATCH, ws, want, got, detail)


def _stored_scan(
    stores: list[tuple[str, Store]], listing: dict[str, str], raw_dir: Path, version: str, rel: str, want: str
) -> dict[str, Any]:
    """A scan read from the DVC cache or a remote, by the md5 the data version's listing gives it."""
    md5 = listing.get(rel)
    obj = dvc_object(stores, md5) if md5 else None
    if obj is None:
        ws = raw_dir / rel
        if ws.is_file() and sha256_file(ws) == want:  # cache pruned, but the workspace copy is intact
            return item(rel, "scan", OK, ws, want, want, "from the workspace (not in the DVC cache)")
        why = (
            f"not in data version {version}'s listing"
            if md5 is None
            else f"object md5 {md5} is not in the DVC cache or any DVC remote"
        )
        return item(rel, "scan", MISSING, None, want, None, why)
    got = object_sha256(obj[1])
    detail = f"from {obj[0]}" + ("" if got == want else ": the stored object was altered")
    return item(rel, "scan", OK if got == want else MISMATCH, obj[1], want, got, detail)
