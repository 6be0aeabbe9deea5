"""Per-epoch pruning of a `medtune tune` trial, from inside the train stage.

`medtune tune` (components/tune/) runs each trial as `dvc exp run train -S ...` with three environment
variables naming its Optuna study storage, study and trial. For each epoch, `should_stop(row)` reports the
study's validation metric (`tune.metric`, stored in the study) to that trial and asks Optuna's pruner
whether to stop; a pruned trial ends like early stopping: the kept epoch's model is written, the
experiment is saved and listed, and the trial records the epoch it was pruned at (user attribute
`pruned_at_epoch`). Without the variables (every ordinary `dvc repro` or `medtune train`) it returns
False at once and never imports Optuna.

    MEDTUNE_TUNE_STORAGE=sqlite:////abs/.medtune/tune/s.db MEDTUNE_TUNE_STUDY=s MEDTUNE_TUNE_TRIAL=3 medtune train
"""

from __future__ import annotations

import functools
import logging
import math
import os
from typing import Any

log = logging.getLogger("medtune.train")

STORAGE_ENV, STUDY_ENV, TRIAL_ENV = "MEDTUNE_TUNE_STORAGE", "MEDTUNE_TUNE_STUDY", "MEDTUNE_TUNE_TRIAL"
# Study user attributes the hook reads: the metric reported, and whether to prune at all (tune.prune).
METRIC_ATTR, PRUNE_ATTR = "metric", "prune"
PRUNED_ATTR = "pruned_at_epoch"  # trial user attribute: the epoch training stopped at by pruning
# SQLite with several writers (the tune process and every running trial): wait for the lock, never fail.
SQLITE_TIMEOUT_S = 60
# tune.prune: stop a trial worse than the median of earlier trials at the same epoch, once 2 are complete.
STARTUP_TRIALS = 2


def minimise(metric: str) -> bool:
    """val_loss and val_mae are minimised; val_auroc and val_accuracy maximised."""
    return metric in ("val_loss", "val_mae")


def make_pruner(prune: bool) -> Any:
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS) if prune else optuna.pruners.NopPruner()


def storage(url: str) -> Any:
    """An Optuna RDB storage; SQLite waits up to SQLITE_TIMEOUT_S for another process's write."""
    import optuna

    kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


@functools.cache  # opened once per process, at the first epoch
def _open_trial(url: str, study_name: str, number: int) -> Any:
    import optuna

    store = storage(url)
    study_id = store.get_study_id_from_name(study_name)
    prune = bool(store.get_study_user_attrs(study_id).get(PRUNE_ATTR, True))
    study = optuna.load_study(study_name=study_name, storage=store, pruner=make_pruner(prune))
    return optuna.trial.Trial(study, store.get_trial_id_from_study_id_trial_number(study_id, number))


def should_stop(row: dict[str, Any]) -> bool:
    """Report this epoch's validation metric to the tuning trial named by the environment; True when
    Optuna prunes it. False, at no cost, when no trial is named."""
    url = os.environ.get(STORAGE_ENV)
    if not url:
        return False
    # Data-parallel training (train.processes > 1): rank 0 reports, and nothing is pruned, since one
    # process stopping alone would leave the others waiting for it in their next collective step.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and os.environ.get("RANK", "0") != "0":
        return False
    trial = _open_trial(url, os.environ[STUDY_ENV], int(os.environ[TRIAL_ENV]))
    metric = trial.study.user_attrs[METRIC_ATTR]
    value = row[metric]
    if not (isinstance(value, (int, float)) and math.isfinite(value)):
        return False  # an undefined value (nan AUROC of a one-class split) is no evidence either way
    trial.report(float(value), int(row["epoch"]))
    if world > 1 or not trial.should_prune():
        return False
    trial.set_user_attr(PRUNED_ATTR, int(row["epoch"]))
    log.info(
        "pruned by tuning study %s, trial %d, after epoch %d: %s %.4g is worse than the median of earlier trials",
        trial.study.study_name,
        trial.number,
        row["epoch"],
        metric,
        value,
    )
    return True
