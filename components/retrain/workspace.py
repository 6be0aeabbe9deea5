"""The project workspace between retrain runs: one run at a time (workspace_lock), the snapshot taken
before a run and the undo of a failed one (back to the last committed state, the failed run's evidence
kept), and the warm start a retrain plans.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from components import common
from components.common import StageError

log = logging.getLogger("medtune.workspace")


@contextlib.contextmanager
def workspace_lock(
    root: str | Path, holder: str, timeout: float, on_wait: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Exclusive lock on the project workspace (one retrain/pipeline run, so one DVC command, at a time).

    An OS file lock (filelock): released by the kernel if the holder dies, so a crash never leaves it
    stuck. Waits up to `timeout` seconds (calling on_wait once with the holder's description), then raises.
    """
    from filelock import FileLock, Timeout

    path = Path(root) / ".dvc" / "tmp" / "medtune-workspace.lock"
    path.parent.mkdir(parents=True, exist_ok=True)

    def record(fd: int) -> None:  # a contender opens the file without truncating it, so this stays readable
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)

    lock = FileLock(path, on_acquired=record)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        if on_wait:
            on_wait(path.read_text().strip() or "another process")
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise StageError(
                f"{path}: held by {path.read_text().strip() or 'another process'} for more than "
                f"{timeout:.0f} s; not starting a second run in the same workspace."
            ) from None
    try:
        yield
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------
# Undoing a failed run: back to the last committed state
# ---------------------------------------------------------------------------------------------

SNAPSHOT_DIR = ".dvc/tmp/medtune-snapshot"  # .dvc/tmp is git-ignored
PARAMS_FILE = "params.yaml"  # the only one the pipeline reads (check_params_file)


def pipeline_outs(root: str | Path) -> list[tuple[str, bool]]:
    """(path relative to root, cached?) of every output of the dvc.yaml stages (DVC's own reading)."""
    from dvc.repo import Repo

    root = Path(root).resolve()
    repo = Repo(str(root))
    try:
        outs = []
        for stage in repo.index.stages:
            if stage.addressing.endswith(".dvc"):  # data/raw.dvc etc.: not a pipeline stage
                continue
            for out in stage.outs:
                outs.append((Path(out.fs_path).resolve().relative_to(root).as_posix(), bool(out.use_cache)))
        return outs
    finally:
        repo.close()


def snapshot_workspace(root: str | Path, raw_dir: str, batch_dests: Sequence[str]) -> dict[str, Any]:
    """What `restore_workspace` needs, taken before a retrain run appends anything.

    Small things only: which batch destinations already existed in raw, whether each pipeline output
    and data/raw.dvc / dvc.lock existed, and copies of the uncached outputs (reports, lineage, card:
    DVC cannot check those out again), of raw.dvc / dvc.lock when git does not track them, and of
    params.yaml (the run sets train.init_from in it; `apply_warm_start`).
    Cached outputs come back from the DVC cache (`dvc checkout`).
    """

    root = Path(root)
    store = root / SNAPSHOT_DIR
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    outs = pipeline_outs(root)
    saved = []
    for rel in [f"{raw_dir}.dvc", "dvc.lock", PARAMS_FILE] + [o for o, cached in outs if not cached]:
        src = root / rel
        if src.is_file():
            (store / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, store / rel)
            saved.append(rel)
        elif src.is_dir():
            shutil.copytree(src, store / rel)
            saved.append(rel)
    return {
        "raw_dir": raw_dir,
        "store": SNAPSHOT_DIR,
        "saved": saved,
        "outs": [{"path": o, "cached": c, "existed": (root / o).exists()} for o, c in outs],
        "raw_existing": sorted(d for d in batch_dests if (root / raw_dir / d).exists()),
    }


def _tracked_at_head(root: Path, rel: str) -> bool:
    return bool(common.git(root, "ls-tree", "--name-only", "HEAD", "--", rel, check=False))


def _remove(path: Path) -> None:

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def restore_workspace(root: str | Path, snap: dict[str, Any], batch_dests: Sequence[str], params: Any) -> list[str]:
    """Put the workspace back to the last committed state after a retrain run failed mid-way.

    1. data/raw.dvc and dvc.lock: `git checkout HEAD --` when tracked (else the snapshot's copy,
       or removed when the run created them).
    2. Raw data: only the batch files that the committed data version does not hold (`dvc diff`
       HEAD vs workspace, "added") or that this run created are removed, plus their labels.csv rows
       in csv mode. Existing raw scans are never touched; the batch originals stay in the inbox.
    3. Pipeline outputs: those the run created are removed; `dvc checkout --force` of the stages
       in the committed dvc.lock restores the cached ones; uncached ones come from the snapshot.
    4. params.yaml: the snapshot's copy (as it was before the run, a user's uncommitted edit included).
    Returns what was done, ending with the `dvc status` afterwards. A step that fails is reported
    in that list, and the remaining steps still run.
    """
    root = Path(root)
    done: list[str] = []
    _restore_dvc_files(root, snap, done)
    _remove_appended(root, snap, batch_dests, params, done)
    _restore_outputs(root, snap, done)
    if PARAMS_FILE in snap["saved"]:
        if _step(
            done,
            f"restore {PARAMS_FILE}",
            lambda: shutil.copy2(root / snap["store"] / PARAMS_FILE, root / PARAMS_FILE) or True,
        ):
            done.append(f"{PARAMS_FILE}: restored as it was before the run")
    status = _step(done, "run dvc status", lambda: common.dvc(root, "status"))
    done.append(f"dvc status: {status}" if status is not None else "dvc status: unknown")
    return done


def _step(done: list[str], what: str, fn: Callable[[], Any]) -> Any:
    """fn()'s result, or None when it raised: the failure is logged and added to `done`."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - keep restoring; the caller reports every failed step
        done.append(f"FAILED to {what}: {exc}")
        log.error("restore: could not %s: %s", what, exc)
        return None


def _restore_dvc_files(root: Path, snap: dict[str, Any], done: list[str]) -> None:
    """restore_workspace step 1: data/raw.dvc and dvc.lock as HEAD (or the snapshot) has them."""
    store = root / snap["store"]
    for rel in (f"{snap['raw_dir']}.dvc", "dvc.lock"):
        if _tracked_at_head(root, rel):
            if _step(
                done,
                f"git checkout HEAD -- {rel}",
                lambda rel=rel: common.git(root, "checkout", "HEAD", "--", rel) or True,
            ):
                done.append(f"{rel}: checked out from HEAD")
        elif rel in snap["saved"]:
            if _step(done, f"restore {rel}", lambda rel=rel: shutil.copy2(store / rel, root / rel) or True):
                done.append(f"{rel}: not tracked by git; restored the copy taken before the run")
        elif (root / rel).exists():
            if _step(done, f"remove {rel}", lambda rel=rel: (root / rel).unlink() or True):
                done.append(f"{rel}: removed (created by this run; not tracked by git)")


def _remove_appended(
    root: Path, snap: dict[str, Any], batch_dests: Sequence[str], params: Any, done: list[str]
) -> None:
    """restore_workspace step 2: what this run (or an earlier crashed attempt of the same batch) added
    to the raw data, nothing else."""
    from components.retrain import raw_append

    raw_dir = snap["raw_dir"]

    def uncommitted() -> set[str]:
        diff = json.loads(common.dvc(root, "diff", "--json", "--targets", raw_dir) or "{}")
        prefix = raw_dir.rstrip("/") + "/"
        return {d["path"][len(prefix) :] for d in diff.get("added", []) if d["path"].startswith(prefix)}

    added = _step(done, "list the raw files the committed data version does not hold (dvc diff)", uncommitted)
    created = set(batch_dests) - set(snap["raw_existing"])
    doomed = sorted(created | (set(batch_dests) & (added or set())))
    removed = (
        _step(
            done,
            "remove the appended batch files from the raw data",
            lambda: raw_append.remove_from_raw(root / raw_dir, doomed, params),
        )
        or []
    )
    done.append(
        f"{raw_dir}: removed {len(removed)} appended file(s) of the failed batch(es); existing raw files untouched"
    )


def _restore_outputs(root: Path, snap: dict[str, Any], done: list[str]) -> None:
    """restore_workspace step 3: the pipeline outputs as the committed dvc.lock and the snapshot have them."""
    import yaml

    store = root / snap["store"]
    for out in snap["outs"]:
        if not out["existed"] and (root / out["path"]).exists():
            if _step(done, f"remove {out['path']}", lambda out=out: _remove(root / out["path"]) or True):
                done.append(f"{out['path']}: removed (created by the failed run)")
    lock = root / "dvc.lock"
    stages = sorted((yaml.safe_load(lock.read_text()) or {}).get("stages", {})) if lock.is_file() else []
    if stages:
        if _step(
            done, "dvc checkout the committed outputs", lambda: common.dvc(root, "checkout", "--force", *stages) or True
        ):
            done.append(f"dvc checkout --force {' '.join(stages)}")
    for out in snap["outs"]:
        if not out["cached"] and out["path"] in snap["saved"]:

            def put_back(rel: str = out["path"]) -> None:
                _remove(root / rel)
                if (store / rel).is_dir():
                    shutil.copytree(store / rel, root / rel)
                else:
                    shutil.copy2(store / rel, root / rel)

            _step(done, f"restore {out['path']}", put_back)
    done.append("uncached outputs (reports, lineage, model card) restored from the snapshot")


def apply_warm_start(root: str | Path, params_path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """Set train.init_from in params.yaml to what this retrain starts from (`registry.warm_start_plan`:
    the champion's weights, or null for a cold start) and return the plan, whose `reason` says which and
    why. params.yaml keeps its comments; it is rewritten only when the value changes, so DVC retrains
    exactly when the starting weights do, and the release commits the value (`dvc params diff` shows it)."""
    from components import presets
    from components.params import load_params
    from components.release import registry

    root = Path(root)
    path = root / params_path
    plan = registry.warm_start_plan(root, load_params(path))
    if load_params(path).train.init_from != plan["init_from"]:
        presets.apply(path, {"train": {"init_from": plan["init_from"]}})
    log.debug("%s", plan["reason"])  # the retrain flow logs it to its run
    return plan


def keep_failed_outputs(root: str | Path, snap: dict[str, Any], dest: str | Path) -> list[str]:
    """Copy the failed run's uncached outputs (e.g. reports/validation.md saying why) to `dest`
    before `restore_workspace` puts the committed ones back. Returns the paths copied."""

    root, dest = Path(root), Path(dest)
    shutil.rmtree(dest, ignore_errors=True)
    copied = []
    for out in snap["outs"]:
        src = root / out["path"]
        if out["cached"] or not src.exists():
            continue
        (dest / out["path"]).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest / out["path"])
        copied.append(out["path"])
    return copied


def undo_failed_run(
    root: str | Path,
    snap: dict[str, Any],
    batch_dests: Sequence[str],
    params: Any,
    batches: Sequence[str],
    error: str,
    quarantine_dir: str | Path,
    context: dict[str, Any],
) -> tuple[list[str], list[dict[str, Any]]]:
    """After a retrain run failed past the append: restore the workspace and quarantine the batches.

    The failed run's reports (e.g. validation.md saying why) are kept first, then
    `restore_workspace` puts the committed ones back, then every appended batch is quarantined with
    the error and a copy of those reports in `failed-run/`. All of them: the pipeline ran on them
    together, so which one caused the failure is not known (the report says so). Never raises, so
    the caller's error is never masked: a step that fails is logged and reported in the result.
    Returns (what restore did, [{"batch", "quarantine" (None if it stays in the inbox)}]).
    """
    from components.retrain import inbox

    root = Path(root)
    evidence = root / (SNAPSHOT_DIR + "-failed-run")
    try:
        keep_failed_outputs(root, snap, evidence)
    except OSError as exc:
        log.warning("could not keep the failed run's reports: %s", exc)
    try:
        restored = restore_workspace(root, snap, batch_dests, params)
    except Exception as exc:  # noqa: BLE001 - reported in the result and the failure record
        restored = [f"FAILED to restore the workspace: {exc}"]
        log.error("could not restore the workspace: %s", exc)
    drop_snapshot(root)
    names = [Path(b).name for b in batches]
    where: list[dict[str, Any]] = []
    for batch in batches:
        try:
            dest = inbox.quarantine(
                batch,
                quarantine_dir,
                [f"pipeline failed after the batch was appended: {error}"],
                {**context, "failure": {"error": error, "batches_in_run": names}, "restored": restored},
            )
            if evidence.is_dir():
                shutil.copytree(evidence, dest / "failed-run")
            where.append({"batch": Path(batch).name, "quarantine": str(dest)})
        except Exception as exc:  # noqa: BLE001 - the batch stays in the inbox, and the record says so
            log.error("could not quarantine %s (it stays in the inbox): %s", batch, exc)
            where.append({"batch": Path(batch).name, "quarantine": None})
    shutil.rmtree(evidence, ignore_errors=True)
    return restored, where


def drop_snapshot(root: str | Path) -> None:

    shutil.rmtree(Path(root) / SNAPSHOT_DIR, ignore_errors=True)
