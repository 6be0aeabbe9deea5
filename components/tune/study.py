"""The Optuna study of a search: where it is kept, how trials are run in it, and its table.

The study lives in `.medtune/tune/<study>.db` (SQLite; the folder ignores itself in git). It records
tune.metric and tune.prune, which the train stage's pruning hook (components/model/pruning.py) reads;
each trial records its experiment's name and score. TPE is seeded by tune.seed; trials run `jobs` at a
time through Optuna's own `optimize(n_jobs=...)`, each one a `dvc exp run --temp` (experiment.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import optuna

from components.common import StageError
from components.model import pruning
from components.params import Params
from components.templates import format_table
from components.tune import experiment, space

log = logging.getLogger("medtune.tune")
STUDY_DIR = Path(".medtune/tune")
EXP_ATTR, SCORE_ATTR, EPOCHS_ATTR, ERROR_ATTR = "experiment", "score", "epochs_run", "error"


def study_path(root: Path, name: str) -> Path:
    return root / STUDY_DIR / f"{name}.db"


def _make_folder(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ignore = folder.parent / ".gitignore"  # .medtune/.gitignore: the studies are no part of git
    if not ignore.exists():
        ignore.write_text("*\n")


@contextlib.contextmanager
def study_lock(root: Path, name: str) -> Iterator[None]:
    """One search per study at a time (StageError otherwise). Holding it, nothing of this study runs
    elsewhere, so what a killed search left (RUNNING trials, DVC's temporary copies) is cleared."""
    path = study_path(root, name).with_suffix(".lock")
    _make_folder(path.parent)
    lock = filelock.FileLock(path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise StageError(f"study {name!r} is being searched by another medtune tune ({path} is locked).") from None
    try:
        yield
    finally:
        lock.release()


def clear_killed(root: Path, s: optuna.Study) -> None:
    """Trials a killed search left RUNNING become FAIL; DVC's leftovers of their experiments go."""
    for t in s.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        s.tell(t.number, state=optuna.trial.TrialState.FAIL)
        log.warning("trial %d was left running by a search that was stopped: marked FAIL", t.number)
    for name in experiment.clear_stale(root, experiment.exp_prefix(s.study_name)):
        log.warning("removed DVC's temporary copy of the interrupted experiment %s", name)


def open_study(root: Path, name: str, params: Params, create: bool = True) -> optuna.Study:
    """The study `name` (created with `create`), its sampler TPE seeded by tune.seed. A study made for
    another metric refuses to go on (its scores would not compare)."""
    path = study_path(root, name)
    if not create and not path.exists():
        raise StageError(f"no tuning study {name!r}: {path} does not exist; run `medtune tune --trials N` first.")
    _make_folder(path.parent)
    tp = params.tune
    direction = "minimize" if pruning.minimise(tp.metric) else "maximize"
    store = pruning.storage(f"sqlite:///{path.resolve()}")
    study = optuna.create_study(
        study_name=name, storage=store, pruner=pruning.make_pruner(tp.prune), direction=direction, load_if_exists=True
    )
    # Seeded by tune.seed plus the trials so far: a search resumed on the same study draws new values
    # (the same seed again would repeat its first random draws, trials DVC's run cache merely restores).
    study.sampler = optuna.samplers.TPESampler(seed=tp.seed + len(study.get_trials(deepcopy=False)))
    recorded = study.user_attrs.get(pruning.METRIC_ATTR)
    if recorded not in (None, tp.metric):
        raise StageError(
            f"study {name!r} ({path}) scores {recorded}, params.yaml tune.metric is {tp.metric}: "
            "set tune.metric back, or start another study with --study NAME."
        )
    study.set_user_attr(pruning.METRIC_ATTR, tp.metric)
    study.set_user_attr(pruning.PRUNE_ATTR, tp.prune)
    return study


class TrialFailed(Exception):
    """A trial that failed on its own (invalid values, its experiment failed): the search goes on."""


@dataclass
class Search:
    """What every trial of one `medtune tune` run shares."""

    root: Path
    study: optuna.Study
    storage_url: str
    raw: dict[str, Any]  # params.yaml as read (HEAD's: the base is clean)
    params: Params
    devices: queue.Queue  # free GPU ids ("" with no GPU): one per running trial
    threads: int  # torch threads per trial


def objective(search: Search, trial: optuna.Trial) -> float:
    """Run one trial: its values (validated first), its experiment, its score; TrialPruned when the
    train stage's pruning hook stopped it. A trial that fails on its own is logged in one line, its
    reason kept in the study (user attribute `error`), and scored nan, which Optuna records as FAIL."""
    try:
        return _objective(search, trial)
    except TrialFailed as exc:
        log.error("%s", exc)
        trial.set_user_attr(ERROR_ATTR, str(exc)[-2000:])
        return math.nan


def _objective(search: Search, trial: optuna.Trial) -> float:
    tp = search.params.tune
    values = space.suggest(trial, tp.space)
    try:
        space.with_values(search.raw, values)
    except ValueError as exc:
        raise TrialFailed(f"trial {trial.number}: values {values} are not valid together: {exc}") from None
    experiment.check_clean_base(search.root)  # an edit made during the search would leak into this trial
    name = experiment.exp_name(search.study.study_name, trial.number)
    trial.set_user_attr(EXP_ATTR, name)
    log.info("trial %d (%s): %s", trial.number, name, " ".join(space.set_flags(values)))
    _run(search, trial.number, name, values)
    try:
        metrics = experiment.live_metrics(search.root, name)
    except Exception as exc:  # noqa: BLE001 - dvc.api raises many kinds; the trial fails, the search goes on
        raise TrialFailed(f"trial {name}: its {experiment.LIVE_METRICS} could not be read: {exc}") from None
    value = experiment.score(metrics, tp.metric)
    trial.set_user_attr(EPOCHS_ATTR, metrics.get("step"))
    trial.set_user_attr(SCORE_ATTR, value)
    pruned = _pruned_at(search.study, trial.number)
    if pruned is not None:
        raise optuna.TrialPruned(f"trial {trial.number} pruned after epoch {pruned}")
    if value is None:
        raise TrialFailed(f"trial {name}: {experiment.LIVE_METRICS} holds no {tp.metric}: {metrics}")
    return value


def _run(search: Search, number: int, name: str, values: dict[str, Any]) -> None:
    device = search.devices.get()  # blocks only if more trials run than were planned for
    try:
        env = {
            pruning.STORAGE_ENV: search.storage_url,
            pruning.STUDY_ENV: search.study.study_name,
            pruning.TRIAL_ENV: str(number),
            # The cores shared out between the trials running at once (torch would take them all each).
            "OMP_NUM_THREADS": str(search.threads),
            **({"CUDA_VISIBLE_DEVICES": device} if device else {}),
        }
        logs = search.root / STUDY_DIR / "logs" / f"{name}.log"
        experiment.run_trial(search.root, name, space.set_flags(values), env, logs)
    except StageError as exc:
        raise TrialFailed(str(exc)) from None
    finally:
        search.devices.put(device)


def _pruned_at(study: optuna.Study, number: int) -> int | None:
    # The hook wrote it from the train process: read the storage, not this process's copy of the trial.
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    return trial.user_attrs.get(pruning.PRUNED_ATTR)


def _stop_when_hopeless(study: optuna.Study, _: optuna.trial.FrozenTrial) -> None:
    # Three failures and no success yet: the cause is not the values (read a trial's log), stop paying for it.
    states = [t.state for t in study.get_trials(deepcopy=False)]
    if states.count(optuna.trial.TrialState.FAIL) >= 3 and optuna.trial.TrialState.COMPLETE not in states:
        log.error("three trials failed and none completed: stopping the search")
        study.stop()


def run_trials(search: Search, trials: int, jobs: int) -> None:
    """`trials` more trials, `jobs` at a time (Optuna's threads; each waits on its own DVC process)."""
    search.study.optimize(
        lambda trial: objective(search, trial),
        n_trials=trials,
        n_jobs=jobs,
        callbacks=[_stop_when_hopeless],
    )


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def trial_table(study: optuna.Study, keys: list[str], metric: str) -> str:
    """One row per trial: number, experiment, values, score (tune.metric of the kept epoch), epochs run,
    state (COMPLETE, PRUNED, FAIL, RUNNING); the best complete trial marked with *."""
    best = _best_number(study)
    rows = []
    for t in study.get_trials(deepcopy=False):
        mark = "*" if t.number == best else ""
        rows.append(
            (
                f"{t.number}{mark}",
                t.user_attrs.get(EXP_ATTR, ""),
                *(_cell(t.params.get(k)) for k in keys),
                _cell(t.user_attrs.get(SCORE_ATTR)),
                _cell(t.user_attrs.get(EPOCHS_ATTR)),
                t.state.name,
            )
        )
    return format_table(rows, ("trial", "experiment", *keys, metric, "epochs", "state"))


def _best_number(study: optuna.Study) -> int | None:
    try:
        return study.best_trial.number
    except ValueError:  # no complete trial yet
        return None


def default_jobs() -> int:
    """tune.jobs 0: one trial per GPU, or one per 4 cores without one."""
    import torch

    gpus = torch.cuda.device_count()
    return gpus if gpus else max(1, (os.cpu_count() or 1) // 4)


def devices(jobs: int) -> queue.Queue:
    """GPU ids handed to running trials, spread evenly ("" each without a GPU: nothing is pinned)."""
    gpus = 0
    if jobs > 1:
        import torch

        gpus = torch.cuda.device_count()
    q: queue.Queue = queue.Queue()
    for j in range(jobs):
        q.put(str(j % gpus) if gpus else "")
    return q
