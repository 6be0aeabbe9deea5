"""Promotion: the release commit and tag that make a model the champion, done so a crash at any step
can be finished or undone (recover). The refusals that keep a release honest are
components.retrain.salt_guard (a public patient salt) and components.retrain.dvc_project (credentials
in .dvc/config, which also says what a release commits).

Promotion is one git commit (what defines the model: data/raw.dvc, dvc.lock, params.yaml, .dvc/config
with the remote, the outputs DVC does not cache; plus the model's registry folder, the release line,
current.json) made after `dvc push`, then a tag `<prefix><model_id>`, then the batches are archived.
A clone checked out at the tag therefore reproduces the model: after `dvc pull`, `dvc status` is clean,
`dvc repro` has nothing to do and `medtune verify` passes. The whole release is written to PENDING
before its first step, so `recover()` (run first by every retrain) finishes a release a crashed run
left half-made, without retraining: the tag and the archive after the commit, or every step again
before it (registry files back to HEAD first). Only when the pipeline outputs changed since is the
release dropped, its batches retrained.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components import common
from components.common import StageError, dvc, git
from components.release.records import registry_dir
from components.release.registry import REGISTRY, current, record_release, set_current, store_model
from components.retrain.dvc_project import ensure_remote, refuse_secrets_in_config, release_paths
from components.retrain.salt_guard import refuse_public_salt_record

log = logging.getLogger("medtune.promote")


# git and DVC commands: common.run_tool / common.git / common.dvc (one at a time in the project root).


# ---------------------------------------------------------------------------------------------
# Recording the outcome (the atomic part)
# ---------------------------------------------------------------------------------------------

# A release in progress: written before the first step of `publish`, removed after its last one
# (the batches archived). `recover()` reads it to finish an interrupted release without retraining.
# Under .dvc/tmp, which DVC keeps out of git.
PENDING = ".dvc/tmp/medtune-release.json"
# The pipeline outputs a pending release commits or copies into the registry: if any of them changed
# since (someone ran the pipeline again), the release cannot be finished as it was decided. With them,
# every file of release_paths() but .dvc/config and the .gitignores (the parameters, the uncached outputs).
RELEASE_INPUTS = (
    "data/raw.dvc",
    "dvc.lock",
    "data/manifest.csv",
    "models/lineage.json",
    "models/model.onnx",
    "models/model_card.md",
)


def pending(root: str | Path = ".") -> dict[str, Any] | None:
    """The interrupted release `recover()` will finish, or None."""
    path = Path(root) / PENDING
    return json.loads(path.read_text()) if path.is_file() else None


def _release_key(record: dict[str, Any]) -> tuple:
    return tuple(record.get(k) for k in ("time", "event", "model_id", "flow_run_id", "data_version"))


def _release_commit(root: Path, plan: dict[str, Any]) -> str | None:
    """The commit that recorded the pending release (its line in registry/releases.jsonl), if any."""
    key = _release_key(plan["record"])
    since = [f"^{plan['head']}"] if plan.get("head") else []
    revs = git(root, "rev-list", "--reverse", "HEAD", *since, "--", f"{REGISTRY}/releases.jsonl", check=False)
    for rev in revs.split():
        for line in git(root, "show", f"{rev}:{REGISTRY}/releases.jsonl", check=False).splitlines():
            try:
                if _release_key(json.loads(line)) == key:
                    return rev
            except (ValueError, AttributeError):
                continue
    return None


def _at_head(root: Path, rel: str) -> bool:
    return bool(git(root, "ls-tree", "--name-only", "HEAD", "--", rel, check=False))


def _restore_uncommitted_records(root: Path) -> list[str]:
    done = []
    for name in ("current.json", "releases.jsonl"):
        rel = f"{REGISTRY}/{name}"
        # Against HEAD, not the index: a crash after `git add` leaves the new records staged.
        if _at_head(root, rel):
            if git(root, "status", "--porcelain", "--", rel):
                git(root, "checkout", "HEAD", "--", rel)
                done.append(f"restored {rel} from HEAD (uncommitted change of a crashed run)")
        elif (root / rel).exists() or git(root, "ls-files", "--", rel):
            git(root, "rm", "-q", "--cached", "--ignore-unmatch", "--", rel)
            (root / rel).unlink(missing_ok=True)
            done.append(f"removed uncommitted {rel} (a crashed run's first promotion)")
    return done


def recover(root: str | Path = ".") -> list[str]:
    """Bring the registry back to a consistent state after a crashed run (run first by every retrain).

    An interrupted release (PENDING) is finished exactly as it was decided, without retraining: if its
    commit was made, only the tag and the archiving of its batches remain; if not, the registry files
    go back to HEAD and the release is recorded again from the start (push, registry copy, release
    line, current.json, commit, tag, archive), provided the pipeline outputs it records are unchanged.
    If they changed, the release is dropped and its batches, still in the inbox, are retrained.
    Without a pending release: registry files written but not committed go back to HEAD, and a tag
    that a crash between commit and tag left out is created. Returns what was done (logged by the
    caller); data files (raw.dvc, dvc.lock) are otherwise left as they are.
    """
    root = Path(root)
    plan = pending(root)
    commit = _release_commit(root, plan) if plan else None
    done = [] if commit else _restore_uncommitted_records(root)
    if plan:
        what = (
            f"the interrupted {plan['record']['event']} release of model {plan['model_id']} "
            f"(flow run {plan['record'].get('flow_run_id')})"
        )
        changed = [
            rel
            for rel, sha in plan["inputs"].items()
            if not (root / rel).is_file() or common.sha256_file(root / rel) != sha
        ]
        if commit:
            done.append(f"finishing {what}: committed at {commit[:12]}; tag and archive its batch(es), no retraining")
            _complete(root, plan)
        elif not changed:
            done.append(
                f"finishing {what}: not committed yet, its pipeline outputs are unchanged; recording it again "
                "(push, registry, commit, tag, archive), no retraining"
            )
            _complete(root, plan)
        else:
            mdir = f"{REGISTRY}/models/{plan['model_id']}"
            if plan["promote"] and not _at_head(root, mdir):
                git(root, "rm", "-r", "-q", "--cached", "--ignore-unmatch", "--", mdir)
                shutil.rmtree(root / mdir, ignore_errors=True)
            (root / PENDING).unlink()
            done.append(
                f"dropped {what}: not committed, and {', '.join(changed)} changed since; its batch(es) "
                "stay in the inbox and are retrained"
            )
    cur = current(root)
    if cur and cur.get("git_tag") and not git(root, "tag", "--list", cur["git_tag"]):
        commit = git(root, "log", "-1", "--format=%H", "--", f"{REGISTRY}/current.json")
        git(root, "tag", "-a", cur["git_tag"], commit, "-m", f"medtune model {cur['model_id']}")
        done.append(f"created missing tag {cur['git_tag']} at {commit[:12]}")
    return done


def _free_tag(root: Path, name: str) -> str:
    tag, n = name, 1
    while git(root, "tag", "--list", tag):
        n += 1
        tag = f"{name}-{n}"
    return tag


def publish(
    root: str | Path,
    decision: dict[str, Any],
    *,
    trigger: str,
    flow_run_id: str | None,
    data_version: str,
    tag_prefix: str = "model-",
    remote_url: str | None = None,
    remote_name: str = "medtune",
    extra_paths: Sequence[str] = (),
    batches: Sequence[str | Path] = (),
    processed_dir: str | Path = "data/inbox-processed",
    allow_public_salt: bool = False,
) -> dict[str, Any]:
    """Record a retrain outcome: dvc push, one git commit (+ tag when promoted), then move `batches`
    to `processed_dir`. Returns the release record.

    Both outcomes commit what defines the pipeline's state (release_paths: the data version's .dvc
    file, dvc.lock, params.yaml, .dvc/config with the remote, the uncached outputs; the new data version
    is real either way), so that a clone at the commit, after `dvc pull`, has a clean `dvc status`.
    Only a promotion stores the model, moves current.json and tags the commit (compare() promotes only
    a model that tag reproduces). Everything is decided and written to PENDING first, so a crash at
    any step is finished by the next run's `recover()`.
    """
    root = Path(root)
    refuse_public_salt_record(root, allow_public_salt)
    refuse_secrets_in_config(root)
    plan = pending(root)
    if plan:
        mine = (plan["record"].get("flow_run_id"), plan["model_id"], plan["record"].get("data_version"))
        if mine != (flow_run_id, decision["challenger"]["model_id"] or "none", data_version):
            raise StageError(
                f"{root / PENDING}: another release ({plan['record']['event']} of model "
                f"{plan['model_id']}) was interrupted; run registry.recover() (every retrain run does) first."
            )
        return _complete(root, plan)  # a retry of this same release (the task retries on I/O errors)
    promote = bool(decision["promote"])
    challenger = decision["challenger"]
    model_id = challenger["model_id"] or "none"
    tag = _free_tag(root, f"{tag_prefix}{model_id}") if promote else None
    paths, uncached = release_paths(root)
    inputs = sorted(
        {*RELEASE_INPUTS, *uncached, *(p for p in paths if p != ".dvc/config" and not p.endswith(".gitignore"))}
    )
    record = {
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "event": "promoted" if promote else "rejected",
        "model_id": model_id,
        "trigger": trigger,
        "flow_run_id": flow_run_id,
        "data_version": data_version,
        "git_tag": tag,
        "champion": {"model_id": decision["champion"]["model_id"], "metrics": decision["champion"]["metrics"]},
        "challenger": {
            "model_id": challenger["model_id"],
            "metrics": challenger["metrics"],
            "gate": challenger.get("gate"),
        },
        "comparison": decision.get("comparison"),
        "reasons": decision["reasons"],
    }
    plan = {
        "record": json.loads(json.dumps(record, default=common._json_default)),
        "promote": promote,
        "model_id": model_id,
        "tag": tag,
        "remote_url": remote_url,
        "remote_name": remote_name,
        "extra_paths": list(extra_paths),
        "batches": [str(b) for b in batches],
        "processed_dir": str(processed_dir),
        "head": git(root, "rev-parse", "--verify", "-q", "HEAD", check=False) or None,
        "paths": paths,
        "uncached": uncached,
        "inputs": {rel: common.sha256_file(root / rel) for rel in inputs if (root / rel).is_file()},
    }
    common.write_json(root / PENDING, plan)
    return _complete(root, plan)


def _complete(root: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """The steps of a release, each skipped when already done, so a crash anywhere can be resumed:
    push, registry copy, release line, current.json, one git commit, tag, archive the batches."""
    promote, model_id, tag, record = plan["promote"], plan["model_id"], plan["tag"], plan["record"]
    commit = _release_commit(root, plan)
    if commit is None:
        if plan["remote_url"]:
            ensure_remote(root, plan["remote_url"], plan["remote_name"])
        refuse_secrets_in_config(root)
        if "paths" not in plan:  # a release left pending by an earlier version of this module
            plan["paths"], plan["uncached"] = release_paths(root)
        paths = [p for p in dict.fromkeys([*plan["paths"], ".dvc/config", *plan["extra_paths"]]) if (root / p).exists()]
        uncached = [p for p in plan["uncached"] if (root / p).exists()]
        # Push first: a tag must never point at data or models that exist only on this machine.
        dvc(root, "push")
        if promote:
            store_model(root, model_id)
            paths += [f"{REGISTRY}/models/{model_id}", f"{REGISTRY}/.gitignore"]
        record_release(root, record)  # keeps the record's time: it identifies the release
        paths.append(f"{REGISTRY}/releases.jsonl")
        if promote:
            set_current(root, model_id, tag)
            paths.append(f"{REGISTRY}/current.json")
        git(root, "add", "--", *paths)
        if uncached:  # outputs only git can carry; forced past a .gitignore that hides their folder
            git(root, "add", "-f", "--", *uncached)
        verb = f"promote model {model_id}" if promote else f"keep champion; challenger {model_id} rejected"
        git(
            root,
            "commit",
            "-q",
            "-m",
            f"medtune retrain ({record['trigger']}): {verb}; data {record['data_version']}",
            "--",
            *paths,
            *uncached,
        )
        commit = git(root, "rev-parse", "HEAD")
    if tag:
        at = git(root, "rev-list", "-n", "1", tag, check=False) if git(root, "tag", "--list", tag) else None
        if at is None:
            git(
                root, "tag", "-a", tag, commit, "-m", f"medtune model {model_id} (flow run {record.get('flow_run_id')})"
            )
        elif at != commit:
            raise StageError(
                f"git tag {tag} points at {at[:12]}, but model {model_id} was recorded at {commit[:12]}; "
                f"expected the tag on that commit. Delete or move the tag ({root / PENDING} keeps the release)."
            )
    from components.retrain import inbox

    for batch in plan["batches"]:
        if (root / batch).is_dir():
            inbox.archive(root / batch, root / plan["processed_dir"])
    (root / PENDING).unlink(missing_ok=True)
    log.info(
        "%s model %s; recorded in %s (tag %s)", record["event"], model_id, registry_dir(root) / "releases.jsonl", tag
    )
    return record


def record_failure(
    root: str | Path,
    *,
    error: str,
    trigger: str,
    flow_run_id: str | None,
    data_version: str,
    batches: Sequence[dict[str, Any]],
    restored: Sequence[str],
) -> dict[str, Any]:
    """Record a retrain run that failed after appending its batches: one `failed` event, one git commit.

    Called after the workspace was restored, so `data_version` is the committed one the champion
    stays on; `model_id` is None (no model came out of the run), `reasons` holds the error, and
    `batches` where each batch was quarantined. Only registry/releases.jsonl is committed (if that
    commit fails, the next run's `recover()` drops the uncommitted line; the quarantine report stays).
    """
    root = Path(root)
    cur = current(root)
    record = record_release(
        root,
        {
            "event": "failed",
            "model_id": None,
            "trigger": trigger,
            "flow_run_id": flow_run_id,
            "data_version": data_version,
            "git_tag": None,
            "champion": {"model_id": (cur or {}).get("model_id")},
            "batches": list(batches),
            "reasons": [f"pipeline failed after the batch(es) were appended: {error}"],
            "restored": list(restored),
        },
    )
    rel = f"{REGISTRY}/releases.jsonl"
    git(root, "add", "--", rel)
    names = ", ".join(b.get("batch", "?") for b in batches)
    git(
        root,
        "commit",
        "-q",
        "-m",
        f"medtune retrain ({trigger}): failed, batch(es) {names} quarantined; champion kept",
        "--",
        rel,
    )
    log.warning("retrain failed; recorded in %s", registry_dir(root) / "releases.jsonl")
    return record
