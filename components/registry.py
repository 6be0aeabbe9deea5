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

import configparser
import datetime as dt
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pandas as pd

from components import common, warm_start
from components.audit import read_current, read_releases, registry_dir
from components.common import StageError, dvc, git  # registry.git/registry.dvc: callers use these names
from components.manifest import read_manifest
from components.params import Params
from components.onnx_runtime import make_session

log = logging.getLogger("medtune.registry")

REGISTRY = "registry"
MODEL_FILES = ("lineage.json", "model_card.md")  # copied from models/; manifest.csv from data/
WEIGHTS = warm_start.WEIGHTS  # models/model.pt, kept beside the ONNX for the next retrain's warm start
MODEL_BINARIES = ("*.onnx", "*.pt")  # in the registry folder but git-ignored: DVC holds them at the tag
# "failed": a retrain run whose pipeline failed after its batches were appended (no model; model_id None).
EVENTS = ("promoted", "rejected", "rollback", "failed")


# git and DVC commands: common.run_tool / common.git / common.dvc (one at a time in the project root).


def ensure_remote(root: str | Path, url: str, name: str = "medtune") -> str:
    """Make sure a default DVC remote exists; add `url` (a local folder by default) if none is set."""
    root = Path(root)
    current = dvc(root, "remote", "default", check=False)
    if current and "No default remote" not in current:
        return current
    path = Path(url)
    if "://" not in url:
        (path if path.is_absolute() else root / path).mkdir(parents=True, exist_ok=True)
    dvc(root, "remote", "add", "--force", "--default", name, url)
    log.info("configured DVC remote %s -> %s", name, url)
    return name


# Remote options that hold a secret: they belong in the environment or .dvc/config.local (git-ignored),
# never in .dvc/config, which every release commits.
SECRET_OPTIONS = ("access_key_id", "secret_access_key", "session_token", "password", "passphrase", "token",
                  "account_key", "sas_token", "connection_string", "client_secret", "gdrive_client_secret",
                  "oss_key_id", "oss_key_secret", "key_secret")


def refuse_secrets_in_config(root: str | Path) -> None:
    """StageError when .dvc/config (committed by every release) holds a credential: a secret option of
    a remote, or a password in a remote's URL. Credentials come from the environment (AWS_ACCESS_KEY_ID,
    ...) or `dvc remote modify --local` (.dvc/config.local, which DVC keeps out of git)."""
    path = Path(root) / ".dvc/config"
    cfg = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        cfg.read(path)
    except configparser.Error as exc:
        raise StageError(f"{path}: not readable as DVC config ({exc})") from exc
    found = [f"[{section}] {key}" for section in cfg.sections() for key, value in cfg[section].items()
             if key in SECRET_OPTIONS or (key == "url" and urlsplit(value).password)]
    if found:
        raise StageError(f"{path} holds credentials ({', '.join(found)}), and a release commits that file to git. "
                         "Move them out: `dvc remote modify --local <remote> <option> <value>` (.dvc/config.local, "
                         "git-ignored) or the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for S3); "
                         "nothing was pushed or committed (docs/orchestration.md, 'Remote storage').")


def release_paths(root: str | Path = ".") -> tuple[list[str], list[str]]:
    """What a release commits from the workspace so that a clone at its tag reproduces it, read from
    DVC's own view of the project: `(paths, uncached)`.

    paths: dvc.lock, .dvc/config (the remote), every parameter file a stage reads (params.yaml), every
    `.dvc` file (the data version) and the .gitignore DVC keeps beside each output. uncached: the
    outputs DVC does not cache (`cache: false` in dvc.yaml). `dvc push` cannot carry those, so git
    must, or a clone at the tag misses them and `dvc status` reports them deleted; they are added
    with `git add -f` because the project's .gitignore may hide their folders (models/, reports/).
    Only files that exist are listed.
    """
    from dvc.repo import Repo

    root = Path(root)
    paths, uncached = {"dvc.lock", ".dvc/config", "params.yaml"}, set()
    try:
        repo = Repo(str(root))
    except Exception as exc:  # noqa: BLE001 - NotDvcRepoError and config errors alike
        raise StageError(f"{root}: not readable as a DVC project ({exc}); a release needs one.") from exc
    with repo:
        def rel(path: str) -> str:
            return Path(os.path.relpath(path, repo.root_dir)).as_posix()

        for stage in repo.index.stages:
            if stage.is_data_source:
                paths.add(rel(stage.path))
            for dep in stage.deps:
                if type(dep).__name__ == "ParamsDependency":
                    paths.add(rel(dep.fs_path))
            for out in stage.outs:
                path = rel(out.fs_path)
                paths.add((Path(path).parent / ".gitignore").as_posix())
                if not out.use_cache:
                    uncached.add(path)
    return sorted(p for p in paths if (root / p).exists()), sorted(p for p in uncached if (root / p).exists())


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
        raise ValueError(f"release record {record!r} is invalid; expected keys {list(required)} and event "
                         f"one of {', '.join(EVENTS)}.")
    record = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **record}
    path = registry_dir(root) / "releases.jsonl"
    old = path.read_text() if path.is_file() else ""
    common.write_text(path, old + json.dumps(record, sort_keys=True, default=common._json_default) + "\n")
    return record


def set_current(root: str | Path, model_id: str, git_tag: str | None) -> Path:
    return common.write_json(registry_dir(root) / "current.json", {"model_id": model_id, "git_tag": git_tag})


def model_dir(root: str | Path, model_id: str) -> Path:
    return registry_dir(root) / "models" / model_id


def store_model(root: str | Path, model_id: str, models_dir: str | Path = "models",
                manifest_csv: str | Path = "data/manifest.csv") -> Path:
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
    lines = ignore.read_text().splitlines() if ignore.is_file() else \
        ["# model files live in the DVC remote: git checkout <tag> && dvc pull"]
    missing = [p for p in MODEL_BINARIES if p not in lines]
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
    model.pt sha256 when `retrain.warm_start` is on and the champion's classes, input shape, backbone and
    ensemble size match `params`; else None (a cold start from ImageNet) and `reason` says why."""
    from components.models import BACKBONES, arch_of  # torch: only when a retrain plans its start

    cur = current(root)
    if not params.retrain.warm_start:
        return {"init_from": None, "model_id": None, "reason": "cold start: retrain.warm_start is false"}
    if not cur:
        return {"init_from": None, "model_id": None, "reason": "cold start: no champion yet"}
    mid, tp, pp = cur["model_id"], params.train, params.preprocess
    if tp.backbone not in BACKBONES:
        return {"init_from": None, "model_id": mid,
                "reason": f"cold start: train.backbone is a checkpoint path ({tp.backbone}), a starting point of its own"}
    try:
        path = champion_checkpoint(root)
        sha = common.sha256_file(path)
        if not sha.startswith(mid):
            raise StageError(f"{path}: sha256 {sha[:12]}... is not champion {mid}'s (a model id is the first 12 "
                             "hex digits of its model.pt's sha256)")
        ckpt = warm_start.read_checkpoint(path, sha)
    except StageError as exc:
        return {"init_from": None, "model_id": mid, "reason": f"cold start: champion {mid}'s weights: {exc}"}
    wrong = warm_start.mismatches(ckpt, params.data.classes, pp.channels, pp.image_size, arch_of(tp.backbone),
                                  tp.ensemble)
    if wrong:
        return {"init_from": None, "model_id": mid,
                "reason": f"cold start: champion {mid} does not match the parameters: its " + "; ".join(wrong)}
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


# ---------------------------------------------------------------------------------------------
# Champion vs challenger
# ---------------------------------------------------------------------------------------------

def onnx_probabilities(onnx_path: str | Path, images: np.ndarray, default_threshold: float,
                       batch: int = 64) -> tuple[np.ndarray, float]:
    """The model's probabilities on uint8 `images`, and the binary threshold it was evaluated (and is
    deployed) with, from its ONNX metadata (`default_threshold` for a model that records none)."""
    session = make_session(Path(onnx_path))
    threshold = json.loads(session.get_modelmeta().custom_metadata_map.get("metrics", "{}")).get("threshold")
    inp = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else None for d in inp.shape]
    if shape[1:] != list(images.shape[1:]):
        raise StageError(f"{onnx_path} expects input {inp.shape[1:]} but the prepared test images are "
                         f"{list(images.shape[1:])}; the two models cannot be compared on the same data.")
    out = [session.run(None, {inp.name: np.asarray(images[i:i + batch], dtype=np.float32) / 255.0})[0]
           for i in range(0, len(images), batch)]
    probs = np.concatenate(out) if out else np.zeros((0, 0), np.float32)
    return probs, default_threshold if threshold is None else float(threshold)


def comparison_rows(index: pd.DataFrame, champion_manifest: str | Path | None) -> np.ndarray:
    """Test rows usable for a fair comparison: patients the champion never trained or validated on."""
    keep = np.ones(len(index), bool)
    if champion_manifest and Path(champion_manifest).is_file():
        m = read_manifest(champion_manifest, required=("patient", "split"))
        seen = set(m.loc[m["split"].isin(["train", "val"]), "patient"]) - {""}
        keep = ~index["patient"].isin(seen).to_numpy()
    return keep


def unreproducible(root: str | Path, lineage: dict[str, Any]) -> list[str]:
    """Why a release tag made now would not reproduce the model `lineage` describes (empty: it would).

    The tag is HEAD plus what the release commits (release_paths: data version, dvc.lock, parameters,
    uncached outputs, registry records), so the code the model was made with must be HEAD's code: the
    lineage says it was committed (`git_dirty` false) at a commit whose code is HEAD's, the working
    tree's code is still HEAD's (common.git_facts), and `dvc status` is clean (dvc.lock describes the
    files it will be committed with). A lineage without a `code` record (older exports) is not checked.
    """
    root = Path(root)
    code = lineage.get("code")
    if not isinstance(code, dict):
        return []
    why = []
    if code.get("git_dirty") is not False:
        why.append("the code was not committed when the model was exported (lineage git_dirty: "
                   f"{json.dumps(code.get('git_dirty'))})")
    commit = str(code.get("git_commit") or "unknown")
    found = common.run_tool(["git", "cat-file", "-e", f"{commit}^{{commit}}"], root, check=False).returncode == 0
    if not found:
        why.append(f"the lineage's git commit {commit[:12]} is not in this repository")
    else:
        changed = git(root, "diff", "--name-only", commit, "HEAD", "--", ".", *common.record_pathspecs(root)).split()
        if changed:
            why.append(f"the code changed between the model's commit {commit[:12]} and HEAD: {', '.join(changed[:10])}"
                       + (f" and {len(changed) - 10} more" if len(changed) > 10 else ""))
    now = common.git_facts(root)
    if now["dirty"]:
        why.append("the working tree's code differs from HEAD (commit it): " + ", ".join(now["modified"][:10])
                   + (f" and {len(now['modified']) - 10} more" if len(now["modified"]) > 10 else ""))
    status = dvc(root, "status", "--json", check=False)
    try:
        stale = sorted(json.loads(status or "{}"))
    except ValueError:
        stale = [status.strip()[-300:] or "dvc status failed"]
    if stale:
        why.append(f"`dvc status` is not clean ({', '.join(stale)}): dvc.lock does not describe the workspace")
    return why


def compare(root: str | Path, params: Params, compare_metric: str, margin: float,
            prepared_dir: str | Path = "data/prepared", models_dir: str | Path = "models",
            reports_dir: str | Path = "reports") -> dict[str, Any]:
    """The promotion decision for the challenger in models/ + reports/ against the registry champion.

    Promote iff the challenger passed the absolute gate AND (no champion, or challenger metric >=
    champion metric - margin on the same test images). Returns {promote, reasons, champion,
    challenger, comparison}; the metrics of both models are in it whatever the outcome.
    """
    from components.evaluate import compute_metrics, read_record
    from components.export import model_id
    from components.preprocess import load_split

    root = Path(root)
    reports, models = root / reports_dir, root / models_dir
    gate = common.read_json(reports / "gate.json")
    # The model id is known even when export was refused.
    challenger = {"model_id": model_id(common.sha256_file(models / "model.pt")) if (models / "model.pt").is_file() else None,
                  "metrics": read_record(reports), "gate": gate}
    # A models/model.onnx left by an earlier run must not stand in for this checkpoint.
    exported = ((models / "lineage.json").is_file() and (models / "model.onnx").is_file()
                and challenger["model_id"] is not None and model_id_of(models) == challenger["model_id"])
    cur = current(root)
    champion = {"model_id": cur["model_id"] if cur else None, "metrics": None}
    reasons: list[str] = []
    blockers: list[str] = []  # the subset of reasons that stop a promotion
    if not gate.get("passed"):
        blockers.append("challenger failed the absolute gate: " + "; ".join(gate.get("failed") or gate.get("reasons", [])))
    elif not exported:
        blockers.append(f"challenger {challenger['model_id']} has no exported model in {models} (export did not run)")
    if cur and cur["model_id"] == challenger["model_id"]:
        return {"promote": False, "reasons": ["challenger is the current champion (same model id); nothing to do"],
                "champion": champion, "challenger": challenger, "comparison": None, "same_model": True}

    comparison = None
    if cur:
        images, index = load_split(root / prepared_dir, "test")
        keep = comparison_rows(index, model_dir(root, cur["model_id"]) / "manifest.csv")
        y = index["label_index"].to_numpy()[keep]
        ev = params.evaluate
        comparison = {"metric": compare_metric, "margin": margin, "n_test": int(len(index)),
                      "n_compared": int(keep.sum()), "excluded_champion_train_patients": int((~keep).sum())}
        try:
            onnx = champion_onnx(root)
            if onnx is None:
                raise StageError(f"champion {cur['model_id']}: its ONNX is neither in the registry nor retrievable "
                                 f"with dvc get at tag {cur.get('git_tag')}")
            subset = np.asarray(images)[keep]
            # Each model at its own recorded threshold (it may have been chosen on its validation split).
            probs, threshold = onnx_probabilities(onnx, subset, ev.threshold)
            champion["metrics"] = compute_metrics(y, probs, params.data.classes, params.positive_index,
                                                  threshold, ev.bootstrap, ev.seed)
            if exported:
                cprobs, cthreshold = onnx_probabilities(models / "model.onnx", subset, ev.threshold)
                comparison["challenger"] = compute_metrics(y, cprobs, params.data.classes, params.positive_index,
                                                           cthreshold, ev.bootstrap, ev.seed)
        except (StageError, ValueError) as exc:
            blockers.append(f"cannot compare with champion {cur['model_id']} on the same test data: {exc}")
        if champion["metrics"] and comparison.get("challenger"):
            a = float(comparison["challenger"][compare_metric])
            b = float(champion["metrics"][compare_metric])
            comparison.update(challenger_value=a, champion_value=b)
            if not np.isfinite(a) or a < b - margin:
                blockers.append(f"challenger {compare_metric} {a:.4f} is worse than champion {b:.4f} by more than "
                               f"the margin {margin} on {comparison['n_compared']} shared test images")
            else:
                reasons.append(f"challenger {compare_metric} {a:.4f} >= champion {b:.4f} - margin {margin} on "
                               f"{comparison['n_compared']} shared test images")
    if not blockers:  # a promotion is tagged: the tag must reproduce the model
        blockers += [f"a release tag would not reproduce challenger {challenger['model_id']}: {w}"
                     for w in unreproducible(root, common.read_json(models / "lineage.json"))]
    promote = not blockers
    reasons = blockers + reasons
    if promote and not cur:
        reasons.append("no champion yet: the first model that passes the gate is promoted")
    return {"promote": promote, "reasons": reasons, "champion": champion, "challenger": challenger,
            "comparison": comparison}


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
RELEASE_INPUTS = ("data/raw.dvc", "dvc.lock", "data/manifest.csv", "models/lineage.json", "models/model.onnx",
                  "models/model_card.md")


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
        what = f"the interrupted {plan['record']['event']} release of model {plan['model_id']} " \
               f"(flow run {plan['record'].get('flow_run_id')})"
        changed = [rel for rel, sha in plan["inputs"].items()
                   if not (root / rel).is_file() or common.sha256_file(root / rel) != sha]
        if commit:
            done.append(f"finishing {what}: committed at {commit[:12]}; tag and archive its batch(es), no retraining")
            _complete(root, plan)
        elif not changed:
            done.append(f"finishing {what}: not committed yet, its pipeline outputs are unchanged; recording it again "
                        "(push, registry, commit, tag, archive), no retraining")
            _complete(root, plan)
        else:
            mdir = f"{REGISTRY}/models/{plan['model_id']}"
            if plan["promote"] and not _at_head(root, mdir):
                git(root, "rm", "-r", "-q", "--cached", "--ignore-unmatch", "--", mdir)
                shutil.rmtree(root / mdir, ignore_errors=True)
            (root / PENDING).unlink()
            done.append(f"dropped {what}: not committed, and {', '.join(changed)} changed since; its batch(es) "
                        "stay in the inbox and are retrained")
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


def refuse_public_salt(root: str | Path, params: Params, batches: Sequence[str | Path] = ()) -> dict[str, str]:
    """Raise StageError when this retrain would hash real patient ids with a public salt (see
    common.salt_status) and `retrain.allow_public_salt` is false; else return the salt status.

    Real ids: the raw data's (data/manifest.json of the last ingest) or any of `batches`' (read as
    the batch check reads them). Run before anything is appended: a promotion commits the hashed
    manifest to git and pushes the data, and a public salt makes those hashes re-identifiable.
    """
    from components import inbox
    from components.ingest import NO_PATIENT

    status = common.salt_status(params.data.patient_salt)
    if status["status"] == "secret" or params.retrain.allow_public_salt:
        return status
    found = []
    manifest = Path(root) / "data/manifest.json"
    if manifest.is_file():
        meta = json.loads(manifest.read_text())
        recorded = meta.get("patient_salt") or {}
        real = recorded.get("real_patient_ids", meta.get("patient_source", NO_PATIENT) != NO_PATIENT)
        if real:
            found.append(f"the raw data (patients from {meta.get('patient_source')}, {manifest})")
    for batch in batches:
        rows, _ = inbox.read_batch(batch, params)
        n = int((rows["patient"] != "").sum()) if len(rows) else 0
        if n:
            found.append(f"batch {batch} ({n} scan(s) with a patient id)")
    if found:
        raise StageError(
            f"patient salt: {' and '.join(found)} would be hashed with a public salt ({status['source']}), and a "
            "promotion commits and pushes those hashes, which anyone with the ids or headers can reverse. Nothing was "
            "appended; the batches stay in the inbox. Set a secret MEDTUNE_PATIENT_SALT in the environment of the "
            "run (the Prefect worker's; the same salt this workspace was built with, if it had one), or set "
            "retrain.allow_public_salt: true in params.yaml only if the patient ids are made up (README, 'Patient salt').")
    return status


def _refuse_public_salt_record(root: Path, allow: bool) -> None:
    """publish's own guard, for callers other than the retrain flow: ingest's record of the salt."""
    manifest = root / "data/manifest.json"
    recorded = (json.loads(manifest.read_text()).get("patient_salt") if manifest.is_file() else None) or {}
    if not allow and recorded.get("status") == "public" and recorded.get("real_patient_ids"):
        raise StageError(f"{manifest}: real patient ids were hashed with a public salt ({recorded.get('source')}); "
                         "not recording (nothing committed or pushed). Set a secret MEDTUNE_PATIENT_SALT and rerun the "
                         "pipeline, or pass allow_public_salt (retrain.allow_public_salt: true) for made-up ids.")


def publish(root: str | Path, decision: dict[str, Any], *, trigger: str, flow_run_id: str | None,
            data_version: str, tag_prefix: str = "model-", remote_url: str | None = None,
            remote_name: str = "medtune", extra_paths: Sequence[str] = (), batches: Sequence[str | Path] = (),
            processed_dir: str | Path = "data/inbox-processed", allow_public_salt: bool = False) -> dict[str, Any]:
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
    _refuse_public_salt_record(root, allow_public_salt)
    refuse_secrets_in_config(root)
    plan = pending(root)
    if plan:
        mine = (plan["record"].get("flow_run_id"), plan["model_id"], plan["record"].get("data_version"))
        if mine != (flow_run_id, decision["challenger"]["model_id"] or "none", data_version):
            raise StageError(f"{root / PENDING}: another release ({plan['record']['event']} of model "
                             f"{plan['model_id']}) was interrupted; run registry.recover() (every retrain run does) first.")
        return _complete(root, plan)  # a retry of this same release (the task retries on I/O errors)
    promote = bool(decision["promote"])
    challenger = decision["challenger"]
    model_id = challenger["model_id"] or "none"
    tag = _free_tag(root, f"{tag_prefix}{model_id}") if promote else None
    paths, uncached = release_paths(root)
    inputs = sorted({*RELEASE_INPUTS, *uncached, *(p for p in paths if p != ".dvc/config" and not p.endswith(".gitignore"))})
    record = {
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "event": "promoted" if promote else "rejected", "model_id": model_id, "trigger": trigger,
        "flow_run_id": flow_run_id, "data_version": data_version, "git_tag": tag,
        "champion": {"model_id": decision["champion"]["model_id"], "metrics": decision["champion"]["metrics"]},
        "challenger": {"model_id": challenger["model_id"], "metrics": challenger["metrics"],
                       "gate": challenger.get("gate")},
        "comparison": decision.get("comparison"), "reasons": decision["reasons"]}
    plan = {"record": json.loads(json.dumps(record, default=common._json_default)), "promote": promote,
            "model_id": model_id, "tag": tag, "remote_url": remote_url, "remote_name": remote_name,
            "extra_paths": list(extra_paths), "batches": [str(b) for b in batches], "processed_dir": str(processed_dir),
            "head": git(root, "rev-parse", "--verify", "-q", "HEAD", check=False) or None,
            "paths": paths, "uncached": uncached,
            "inputs": {rel: common.sha256_file(root / rel) for rel in inputs if (root / rel).is_file()}}
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
        git(root, "commit", "-q", "-m", f"medtune retrain ({record['trigger']}): {verb}; data {record['data_version']}",
            "--", *paths, *uncached)
        commit = git(root, "rev-parse", "HEAD")
    if tag:
        at = git(root, "rev-list", "-n", "1", tag, check=False) if git(root, "tag", "--list", tag) else None
        if at is None:
            git(root, "tag", "-a", tag, commit, "-m", f"medtune model {model_id} (flow run {record.get('flow_run_id')})")
        elif at != commit:
            raise StageError(f"git tag {tag} points at {at[:12]}, but model {model_id} was recorded at {commit[:12]}; "
                             f"expected the tag on that commit. Delete or move the tag ({root / PENDING} keeps the release).")
    from components import inbox

    for batch in plan["batches"]:
        if (root / batch).is_dir():
            inbox.archive(root / batch, root / plan["processed_dir"])
    (root / PENDING).unlink(missing_ok=True)
    log.info("%s model %s; recorded in %s (tag %s)", record["event"], model_id, registry_dir(root) / "releases.jsonl", tag)
    return record


def record_failure(root: str | Path, *, error: str, trigger: str, flow_run_id: str | None, data_version: str,
                   batches: Sequence[dict[str, Any]], restored: Sequence[str]) -> dict[str, Any]:
    """Record a retrain run that failed after appending its batches: one `failed` event, one git commit.

    Called after the workspace was restored, so `data_version` is the committed one the champion
    stays on; `model_id` is None (no model came out of the run), `reasons` holds the error, and
    `batches` where each batch was quarantined. Only registry/releases.jsonl is committed (if that
    commit fails, the next run's `recover()` drops the uncommitted line; the quarantine report stays).
    """
    root = Path(root)
    cur = current(root)
    record = record_release(root, {
        "event": "failed", "model_id": None, "trigger": trigger, "flow_run_id": flow_run_id,
        "data_version": data_version, "git_tag": None,
        "champion": {"model_id": (cur or {}).get("model_id")}, "batches": list(batches),
        "reasons": [f"pipeline failed after the batch(es) were appended: {error}"], "restored": list(restored)})
    rel = f"{REGISTRY}/releases.jsonl"
    git(root, "add", "--", rel)
    names = ", ".join(b.get("batch", "?") for b in batches)
    git(root, "commit", "-q", "-m", f"medtune retrain ({trigger}): failed, batch(es) {names} quarantined; "
        "champion kept", "--", rel)
    log.warning("retrain failed; recorded in %s", registry_dir(root) / "releases.jsonl")
    return record
