"""The DVC cache and every DVC remote, read through DVC's own object databases, for `medtune verify`.

    stores, notes = dvc_stores(root)          # [(name, Store)]: the cache, the default remote, the others
    where, obj = dvc_object(stores, md5)      # the first store holding that object (a Path or a RemoteObject)

The cache and the remotes are configured as DVC configures them (`dvc.repo.Repo`: .dvc/config,
config.local and the environment), so an S3 or any other remote is read directly and a fresh clone
can be verified without `dvc pull`; the md5 of a model file at its release tag is what DVC's index of
that commit says (dvc.yaml + dvc.lock); a data version's listing is read by dvc-data's Tree.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from components.common import sha256_file


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


def object_sha256(obj: Path | RemoteObject) -> str:
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


def tag_outs(root: Path, tag: str | None, notes: list[str]) -> dict[str, str] | None:
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


def read_listing(blob: bytes) -> dict[str, str]:
    """{relpath: md5} of a DVC directory listing (`<md5>.dir`), read by DVC's own Tree; {} when unreadable."""
    from dvc_data.hashfile.tree import Tree

    try:
        return {"/".join(key): str(hash_info.value) for key, _, hash_info in Tree.from_list(json.loads(blob), "md5")}
    except (ValueError, TypeError, KeyError, AttributeError):
        return {}  # reported by the listing's own hash check; every scan of it is then missing
