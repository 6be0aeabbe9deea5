"""The evidence files behind one model's audit report (`medtune report`): its validation report, ROC and
confusion plots (a regression's predicted-vs-true scatter.csv instead), augmentation preview, training
curves and explanation samples, read from where they are.

    found, notes = gather(lineage, root, tag)   # {key: Evidence}; each says where it came from, or why it is missing

Where from, in order:
1. the workspace (reports/, dvclive/), when it still holds this model's outputs: models/lineage.json is
   this model, models/model.pt is its checkpoint and reports/evaluation.json its evaluation;
2. the model's release tag: a file git holds at the tag (the outputs DVC does not cache, which a release
   commits), else the output's object in the DVC cache or a DVC remote, by the md5 the tag's dvc.lock
   gives it (components.audit.stores, as `medtune verify` reads them; nothing is checked out or pulled).
An item found in neither says why (never silently left out).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.audit.stores import RemoteObject, dvc_object, dvc_stores, read_listing, release_outs
from components.common import git, sha256_file
from components.release.records import LINEAGE, git_show, load_lineage


@dataclass(frozen=True)
class Item:
    key: str
    title: str
    path: str  # relative to the project root; a folder when `folder`
    folder: bool = False
    suffix: tuple[str, ...] = ()  # a folder's files of these kinds only


ITEMS = (
    Item("validation", "validation report", "reports/validation.json"),
    Item("roc", "ROC curve", "reports/roc.png"),
    Item("confusion", "confusion matrix", "reports/confusion.png"),
    Item("augment_preview", "augmentation preview", "reports/augment_preview.png"),
    Item("training_curves", "training curves", "dvclive/plots/metrics", folder=True, suffix=(".tsv",)),
    # Grad-CAM overlays of test images and index.json, which says what each one shows (evaluate writes them).
    Item("explanations", "explanation samples", "reports/explanations", folder=True, suffix=(".png", ".json")),
)
# A regression (its evaluation record's task) has no ROC curve or confusion matrix: its predicted-vs-true
# points on the test split instead (evaluate's scatter.csv, columns true,predicted), in the ROC's place.
SCATTER = Item("scatter", "predicted vs true", "reports/scatter.csv")
CLASSIFICATION_ONLY = ("roc", "confusion")


def items_for(lineage: dict[str, Any]) -> tuple[Item, ...]:
    """The evidence of the model `lineage` describes: ITEMS, or for a regression ITEMS with SCATTER in place
    of the classification plots."""
    metrics = (lineage.get("evaluation") or {}).get("metrics")
    if not (isinstance(metrics, dict) and metrics.get("task") == "regression"):
        return ITEMS
    swapped = [SCATTER if item.key == "roc" else item for item in ITEMS]
    return tuple(item for item in swapped if item.key not in CLASSIFICATION_ONLY)


@dataclass
class Evidence:
    item: Item
    files: dict[str, bytes] = field(default_factory=dict)  # path under the item (its own name for a file) -> bytes
    source: str | None = None
    why: str | None = None  # why it is not available

    @property
    def found(self) -> bool:
        return bool(self.files)


class Workspace:
    """The project's own reports/ and dvclive/ (only when they are this model's: `workspace_mismatch`)."""

    def __init__(self, root: Path):
        self.root, self.name = root, "workspace"

    def read(self, item: Item) -> dict[str, bytes]:
        path = self.root / item.path
        if not item.folder:
            return {Path(item.path).name: path.read_bytes()} if path.is_file() else {}
        if not path.is_dir():
            return {}
        return {
            p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*"))
            if p.is_file()
            and p.name.endswith(item.suffix)
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        }


class ReleaseTag:
    """The files of a release tag: what git holds at it, else DVC's object for the output (cache, then remotes)."""

    def __init__(self, root: Path, tag: str):
        self.root, self.tag, self.name = root, tag, f"release tag {tag}"
        self.outs = release_outs(root, tag)  # DvcException (or a git error) when DVC cannot read the tag
        self.stores, self.notes = dvc_stores(root)

    def _object(self, md5: str) -> bytes | None:
        found = dvc_object(self.stores, md5)
        if found is None:
            return None
        obj = found[1]
        return obj.read_bytes() if isinstance(obj, (Path, RemoteObject)) else None

    def _listing(self, md5: str) -> dict[str, str]:
        blob = self._object(md5)
        return read_listing(blob) if blob is not None else {}

    def _git_files(self, path: str) -> list[str]:
        listed = git(self.root, "ls-tree", "-r", "--name-only", self.tag, "--", path, check=False)
        return [line for line in listed.splitlines() if line]

    def _git_read(self, rel: str) -> bytes | None:
        return git_show(self.root, self.tag, rel)

    def _dvc_files(self, path: str) -> dict[str, str]:
        """{path: md5} of every file DVC tracks at the tag that is `path` or lies under it, whether its
        output is the file, a folder above it (listed by `<md5>.dir`) or a file or folder below `path`."""
        found = {}
        for out, md5 in self.outs.items():
            if not (out == path or out.startswith(path + "/") or path.startswith(out + "/")):
                continue
            if md5.endswith(".dir"):
                found.update({f"{out}/{rel}": file_md5 for rel, file_md5 in self._listing(md5).items()})
            else:
                found[out] = md5
        return {p: md5 for p, md5 in found.items() if p == path or p.startswith(path + "/")}

    def read(self, item: Item) -> dict[str, bytes]:
        if not item.folder:
            md5 = self._dvc_files(item.path).get(item.path)
            blob = self._git_read(item.path) if md5 is None else self._object(md5)
            return {Path(item.path).name: blob} if blob is not None else {}
        files: dict[str, bytes] = {}
        for path, md5 in self._dvc_files(item.path).items():
            blob = self._object(md5) if path.endswith(item.suffix) else None
            if blob is not None:
                files[path[len(item.path) + 1 :]] = blob
        for path in self._git_files(item.path):
            if path.endswith(item.suffix) and path[len(item.path) + 1 :] not in files:
                blob = self._git_read(path)
                if blob is not None:
                    files[path[len(item.path) + 1 :]] = blob
        return dict(sorted(files.items()))


def workspace_mismatch(lineage: dict[str, Any], root: Path) -> str | None:
    """Why the workspace's reports/ and dvclive/ are not the evidence of the model `lineage` describes
    (None when they are)."""
    lineage_path = root / "models" / LINEAGE
    if not lineage_path.is_file():
        return f"no exported model in the workspace ({lineage_path} not found)"
    other = load_lineage(lineage_path).get("model_id")
    if other != lineage.get("model_id"):
        return f"the workspace holds model {other} ({lineage_path})"
    ckpt = root / "models" / "model.pt"
    if ckpt.is_file() and sha256_file(ckpt) != lineage.get("checkpoint_sha256"):
        return f"{ckpt} is another checkpoint than this model's: trained again since the export"
    record = root / "reports" / "evaluation.json"
    lineage_eval = (lineage.get("evaluation") or {}).get("metrics")
    if record.is_file() and _canonical(json.loads(record.read_text(encoding="utf-8"))) != _canonical(lineage_eval):
        return f"{record} is another evaluation than the one this model's lineage records: evaluated again since"
    return None


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)  # NaN compares equal as text, unlike as a float


def gather(lineage: dict[str, Any], root: str | Path, tag: str | None) -> tuple[dict[str, Evidence], list[str]]:
    """Every item (items_for) of the model `lineage` describes, from the workspace when it holds this model's outputs, else from
    its release tag; plus notes on the sources. A missing item's `why` names what was looked at."""
    root = Path(root)
    notes: list[str] = []
    mismatch = workspace_mismatch(lineage, root)
    sources: list[Any] = [Workspace(root)] if mismatch is None else []
    if mismatch:
        notes.append(f"workspace not used: {mismatch}")
    tag_source: ReleaseTag | None = None
    tag_why = "the model was never released (no release tag)" if not tag else None
    found: dict[str, Evidence] = {}
    for item in items_for(lineage):
        ev = Evidence(item)
        for src in sources:
            ev.files, ev.source = src.read(item), src.name
            if ev.found:
                break
        if not ev.found and tag and tag_source is None and tag_why is None:
            tag_source, tag_why = _open_tag(root, tag)
            if tag_source is not None:
                sources.append(tag_source)
                notes.extend(tag_source.notes)
                ev.files, ev.source = tag_source.read(item), tag_source.name
        if not ev.found:
            ev.source, ev.why = None, _why_missing(item, mismatch, tag, tag_why)
        found[item.key] = ev
    if tag_why and tag:
        notes.append(f"release tag {tag} not read: {tag_why}")
    return found, notes


def _open_tag(root: Path, tag: str) -> tuple[ReleaseTag | None, str | None]:
    try:
        return ReleaseTag(root, tag), None
    except Exception as exc:  # noqa: BLE001 - DVC or git cannot read the tag: the report says so
        return None, f"{type(exc).__name__}: {str(exc)[:200]}"


def _why_missing(item: Item, mismatch: str | None, tag: str | None, tag_why: str | None) -> str:
    kind = f"no {' or '.join(item.suffix)} file under {item.path}/" if item.folder else f"no {item.path}"
    where = [f"{kind} in the workspace" if mismatch is None else f"workspace not used: {mismatch}"]
    if tag and tag_why is None:
        where.append(f"nor in git or the DVC cache/remotes at release tag {tag}")
    elif tag:
        where.append(f"release tag {tag} not readable: {tag_why}")
    else:
        where.append("no release tag to read it from (never released)")
    return "; ".join(where)
