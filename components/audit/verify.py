"""`medtune verify MODEL`: re-hash everything a model's lineage names; exit 1 on any mismatch.

    medtune verify models/                   # the workspace model
    medtune verify 3f2a9c1e0b7d --json       # an old model from the registry

Checked, each reported by name: the ONNX file and the checkpoint (in the model's folder, the
registry, or the DVC cache / any DVC remote at the model's release tag), the manifest copy and
its content hash, the DVC listing of the data version, and every raw scan of that data version.
Scans come from the workspace when `data/raw.dvc` still names the model's data version and the raw
folder exists (a changed or missing file there is then a finding), otherwise from the DVC cache or
a DVC remote, by the md5 the data version's listing (`<data_version>.dir`) gives each scan.
Everything DVC-specific is read through DVC itself: the cache and the remotes are its object databases
(`dvc.repo.Repo`, configured from .dvc/config, config.local and the environment), so an S3 or any other
remote is read directly and a fresh clone can be verified without `dvc pull`; the md5 of a model file
at its release tag is what DVC's index of that commit says (dvc.yaml + dvc.lock); a listing is read
by dvc-data's Tree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.audit.lookup import ModelRef, add_common_args, onnx_metadata_id, resolve_model
from components.common import dvc_data_version, run_cli, sha256_bytes, sha256_file
from components.data.manifest import LISTING_COLUMNS, read_manifest_rows
from components.release.records import events_for, read_releases, registry_dir
from components.templates import render as render_template

OK, MISMATCH, MISSING = "ok", "mismatch", "missing"


def _item(
    item: str,
    kind: str,
    status: str,
    path: Any = None,
    expected: str | None = None,
    actual: str | None = None,
    detail: str = "",
) -> dict[str, Any]:
    return {
        "item": item,
        "kind": kind,
        "status": status,
        "path": None if path is None else str(path),
        "expected": expected,
        "actual": actual,
        "detail": detail,
    }


# ---------------------------------------------------------------------------------------------
# DVC stores: the cache and every remote, read through DVC's own object databases
# ---------------------------------------------------------------------------------------------


class RemoteObject:
    """One object in a DVC remote that is not a local folder (S3, GCS, Azure, SSH, HTTP, ...), read
    through the remote's DVC filesystem, so any remote DVC can push to can be checked."""

    def __init__(self, fs: Any, path: str, url: str):
        self.fs, self.path, self.url = fs, path, url

    def read_bytes(self) -> bytes:
        with self.fs.open(self.path, "rb") as fh:
            return fh.read()

    def sha256(self, chunk: int = 1 << 20) -> str:
        h = hashlib.sha256()
        with self.fs.open(self.path, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
        return h.hexdigest()

    def __str__(self) -> str:
        return self.url


class Store:
    """A DVC object database (the cache or a remote): `find(md5)` gives the object, a local Path or a
    RemoteObject, or None. A remote that cannot be read (unreachable, no credentials) is noted once and
    then treated as not holding anything, so verify reports what it could not check as MISSING."""

    def __init__(self, name: str, odb: Any, notes: list[str]):
        from dvc_objects.fs.local import LocalFileSystem

        self.name, self.odb, self.notes, self.failed = name, odb, notes, False
        self.local = isinstance(odb.fs, LocalFileSystem)

    def find(self, md5: str) -> Path | RemoteObject | None:
        path = self.odb.oid_to_path(md5)
        if self.local:
            return Path(path) if Path(path).is_file() else None
        if self.failed:
            return None
        try:
            if not self.odb.fs.isfile(path):
                return None
            return RemoteObject(self.odb.fs, path, self.odb.fs.unstrip_protocol(path))
        except Exception as exc:  # noqa: BLE001 - any transport or credential error of any remote
            self.failed = True
            self.notes.append(
                f"{self.name} could not be read ({type(exc).__name__}: {str(exc)[:200]}); its objects "
                "count as missing (check the remote's URL, endpoint and credentials)"
            )
            return None


def dvc_stores(root: str | Path) -> tuple[list[tuple[str, Store]], list[str]]:
    """[(name, store)] of the DVC cache, then the default remote, then every other remote, as DVC itself
    configures them (.dvc/config, config.local, the environment's credentials); plus notes."""
    from dvc.repo import Repo

    notes: list[str] = []
    try:
        repo = Repo(str(root))
    except Exception as exc:  # noqa: BLE001 - not a DVC project, or a config DVC refuses
        return [], [f"{root} is not readable as a DVC project ({type(exc).__name__}): no DVC cache or remote read"]
    stores = [("DVC cache", Store("DVC cache", repo.cache.local, notes))]
    names = list(repo.config.get("remote") or {})
    default = (repo.config.get("core") or {}).get("remote")
    for name in sorted(names, key=lambda n: n != default):
        try:
            odb = repo.cloud.get_remote_odb(name, command="medtune verify")
        except Exception as exc:  # noqa: BLE001 - e.g. a plugin (dvc-s3) missing for its scheme
            notes.append(f"remote {name} not read ({type(exc).__name__}: {str(exc)[:200]})")
            continue
        label = f"DVC remote {name}"
        stores.append((label, Store(label, odb, notes)))
    repo.close()
    return stores, notes


def dvc_object(stores: list[tuple[str, Store]], md5: str) -> tuple[str, Path | RemoteObject] | None:
    """The first store holding the object with this md5 (a file, or a directory listing `<md5>.dir`)."""
    for name, store in stores:
        obj = store.find(md5)
        if obj is not None:
            return name, obj
    return None


def _sha256(obj: Path | RemoteObject) -> str:
    return obj.sha256() if isinstance(obj, RemoteObject) else sha256_file(obj)


def release_outs(root: str | Path, tag: str) -> dict[str, str]:
    """{output path: md5} of every output DVC tracks at git revision `tag`, as DVC itself reads that commit's
    dvc.yaml, dvc.lock and .dvc files (nothing is checked out). DvcException when DVC cannot read them."""
    from dvc.repo import Repo

    with Repo(str(root), rev=tag) as repo:
        return {
            repo.fs.relpath(out.fs_path, repo.root_dir): str(out.hash_info.value)
            for out in repo.index.outs
            if out.hash_info and out.hash_info.value
        }


def _tag_outs(root: Path, tag: str | None, notes: list[str]) -> dict[str, str] | None:
    """release_outs at the model's release tag; {} without a tag, None (and a note) when DVC cannot read it."""
    from dvc.exceptions import DvcException

    if not tag:
        return {}
    try:
        return release_outs(root, tag)
    except DvcException as exc:
        notes.append(
            f"DVC could not read dvc.yaml / dvc.lock at tag {tag} ({type(exc).__name__}: {str(exc)[:200]}): "
            "model files absent from disk cannot be looked up in the DVC cache or remotes"
        )
        return None


def _listing(blob: bytes) -> dict[str, str]:
    """{relpath: md5} of a DVC directory listing (`<md5>.dir`), read by DVC's own Tree; {} when unreadable."""
    from dvc_data.hashfile.tree import Tree

    try:
        return {"/".join(key): str(hash_info.value) for key, _, hash_info in Tree.from_list(json.loads(blob), "md5")}
    except (ValueError, TypeError, KeyError, AttributeError):
        return {}  # reported by the listing's own hash check; every scan of it is then missing


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------


def _model_files(
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
        return [_item(name, kind, MISSING, detail="the lineage records no sha256 for it")]
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
        items.append(_item(name, kind, OK if got == want else MISMATCH, path, want, got, detail))
    if items:
        return items
    md5 = (tag_outs or {}).get(lock_path)
    obj = dvc_object(stores, md5) if md5 else None
    if obj:
        got = _sha256(obj[1])
        return [
            _item(
                name,
                kind,
                OK if got == want else MISMATCH,
                obj[1],
                want,
                got,
                f"{lock_path} from {obj[0]} (md5 {md5} in dvc.lock at tag {tag})",
            )
        ]
    where = ", ".join(str(d) for d in m.file_dirs)
    why = f"not in {where}" + (
        f"; {lock_path} md5 {md5} (dvc.lock at tag {tag}) is not in the DVC cache or any DVC remote"
        if md5
        else "; no release tag with a dvc.lock to find it in DVC"
        if not tag
        else f"; DVC could not read dvc.lock at tag {tag} (see the notes)"
        if tag_outs is None
        else f"; dvc.lock at tag {tag} does not list {lock_path}"
    )
    return [_item(name, kind, MISSING, None, want, None, why)]


def _manifest(m: ModelRef, root: Path) -> tuple[list[dict[str, Any]], Path | None]:
    """Every copy of the model's manifest is checked; the first intact one lists the scans."""
    data = m.lineage.get("data") or {}
    want = data.get("manifest_sha256")
    copies = [d / "manifest.csv" for d in m.file_dirs]
    if data.get("manifest_path") and m.lineage_path.parent.resolve() == (root / "models").resolve():
        copies.append(root / str(data["manifest_path"]))  # the workspace model's manifest is data/manifest.csv
    found = [p for p in copies if p.is_file()]
    if not found:
        return [
            _item(
                "manifest.csv", "manifest", MISSING, None, want, None, f"no copy in {', '.join(str(c) for c in copies)}"
            )
        ], None
    items, good = [], []
    for path in found:
        got = sha256_file(path)
        items.append(
            _item(
                "manifest.csv",
                "manifest",
                OK if got == want else MISMATCH,
                path,
                want,
                got,
                "" if got == want else "the per-image manifest was changed after export",
            )
        )
        if got == want:
            good.append(path)
    path = (good or found)[0]
    rows = read_manifest_rows(path, LISTING_COLUMNS)
    listing = "".join(f"{r['path']}  {r['sha256']}\n" for r in rows)  # ingest's content_hash, sha256sum format
    got_c, want_c = sha256_bytes(listing.encode()), data.get("content_hash")
    items.append(
        _item(
            "content_hash",
            "manifest",
            OK if got_c == want_c else MISMATCH,
            path,
            want_c,
            got_c,
            "" if got_c == want_c else "path+sha256 list of the manifest differs from the recorded one",
        )
    )
    return items, path


def _scans(m: ModelRef, root: Path, manifest: Path, stores: list[tuple[str, Store]]) -> list[dict[str, Any]]:
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
        if obj is None:
            if not workspace_claims:
                return [
                    _item(
                        f"{version}",
                        "data version",
                        MISSING,
                        None,
                        version,
                        None,
                        f"the listing of data version {version} is not in the DVC cache or any DVC remote, and "
                        f"{raw_dir} does not hold that version (push it from a workspace that has it)",
                    )
                ]
        else:
            blob = obj[1].read_bytes()
            got = hashlib.md5(blob).hexdigest() + ".dir"
            items.append(
                _item(
                    version,
                    "data version",
                    OK if got == version else MISMATCH,
                    obj[1],
                    version,
                    got,
                    f"DVC listing from {obj[0]}",
                )
            )
            listing = _listing(blob)
    source = f"workspace {raw_dir}" if workspace_claims else "DVC cache/remote"
    for r in rows:
        rel, want = r["path"], r["sha256"]
        ws = raw_dir / rel
        if workspace_claims:
            if not ws.is_file():
                items.append(
                    _item(
                        rel,
                        "scan",
                        MISSING,
                        ws,
                        want,
                        None,
                        f"missing from {raw_dir}, which "
                        f"{raw_dir}.dvc says holds data version {version} (`dvc checkout` restores it)",
                    )
                )
                continue
            got = sha256_file(ws)
            items.append(
                _item(
                    rel,
                    "scan",
                    OK if got == want else MISMATCH,
                    ws,
                    want,
                    got,
                    "" if got == want else f"changed in {raw_dir} since ingest",
                )
            )
            continue
        md5 = (listing or {}).get(rel)
        obj = dvc_object(stores, md5) if md5 else None
        if obj is None:
            if ws.is_file() and sha256_file(ws) == want:  # cache pruned, but the workspace copy is intact
                items.append(_item(rel, "scan", OK, ws, want, want, "from the workspace (not in the DVC cache)"))
            else:
                items.append(
                    _item(
                        rel,
                        "scan",
                        MISSING,
                        None,
                        want,
                        None,
                        f"not in data version {version}'s listing"
                        if md5 is None
                        else f"object md5 {md5} is not in the DVC cache or any DVC remote",
                    )
                )
            continue
        got = _sha256(obj[1])
        items.append(
            _item(
                rel,
                "scan",
                OK if got == want else MISMATCH,
                obj[1],
                want,
                got,
                f"from {obj[0]}" + ("" if got == want else ": the stored object was altered"),
            )
        )
    for it in items:
        it.setdefault("source", source)
    return items


def verify(ref: str | Path, root: str | Path = ".") -> dict[str, Any]:
    """Re-hash what the lineage names. `ok` is True only when every item matches."""
    root = Path(root)
    m = resolve_model(ref, root, by_content=False)
    L = m.lineage
    tag = next(
        (e.get("git_tag") for e in events_for(read_releases(registry_dir(root)), m.model_id) if e.get("git_tag")), None
    )
    stores, notes = dvc_stores(root)
    tag_outs = _tag_outs(root, tag, notes)
    ckpt = L.get("checkpoint_sha256")
    items = [
        _item(
            "model_id",
            "identity",
            OK if ckpt and ckpt[:12] == m.model_id else MISMATCH,
            m.lineage_path,
            m.model_id,
            (ckpt or "")[:12] or None,
            "model id = first 12 hex of the checkpoint sha256",
        )
    ]
    items += _model_files(m, "model.onnx", "models/model.onnx", L.get("onnx_sha256"), tag, tag_outs, stores, "onnx")
    items += _model_files(m, "model.pt", "models/model.pt", ckpt, tag, tag_outs, stores, "checkpoint")
    manifest_items, manifest = _manifest(m, root)
    items += manifest_items
    if manifest is not None:
        items += _scans(m, root, manifest, stores)
    bad = [i for i in items if i["status"] != OK]
    return {
        "model_id": m.model_id,
        "lineage": str(m.lineage_path),
        "git_tag": tag,
        "ok": not bad,
        "checked": len(items),
        "failed": len(bad),
        "notes": list(m.notes) + notes,
        "items": items,
    }


def _finding(i: dict[str, Any]) -> tuple[str, str, str]:
    """One checked item as (STATUS, kind, what: the item, where it was read, and for a failure the hashes)."""
    what = i["item"]
    if i["path"] and i["path"] != i["item"]:
        what += f"  [{i['path']}]"
    if i["status"] != OK:
        what += f"  expected {(i['expected'] or '-')[:16]}, found {(i['actual'] or '-')[:16]}"
    return i["status"].upper(), i["kind"], what + (f"  ({i['detail']})" if i["detail"] else "")


def render(rep: dict[str, Any]) -> str:
    """The readable report (audit/templates/verify.txt.j2): every item but the matching scans, which are
    counted in one line."""
    scans = [i for i in rep["items"] if i["kind"] == "scan"]
    findings = [_finding(i) for i in rep["items"] if not (i["kind"] == "scan" and i["status"] == OK)]
    return render_template(
        "audit/templates/verify.txt.j2",
        rep=rep,
        findings=findings,
        scans=scans,
        scans_ok=sum(i["status"] == OK for i in scans),
    ).rstrip("\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="medtune verify",
        description="Re-hash the ONNX file, the checkpoint "
        "and every raw scan a model's lineage names; exit 1 on any mismatch.",
    )
    parser.add_argument("model", help="an ONNX file, a model directory, a model id (or prefix), or `current`")
    add_common_args(parser)

    def run(args: argparse.Namespace) -> int:
        rep = verify(args.model, args.root)
        print(json.dumps(rep, indent=2) if args.json else render(rep))
        return 0 if rep["ok"] else 1

    return run_cli(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
