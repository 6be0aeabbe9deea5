"""`medtune tune --apply`: the best complete trial's values into params.yaml, comments and order kept
(the same round-trip writer as `medtune preset --apply`), checked before anything is written. Then
`dvc params diff` shows the change and `dvc repro` trains with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

from components.common import StageError
from components.presets import apply as apply_overrides
from components.tune.study import EXP_ATTR, SCORE_ATTR


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The best COMPLETE trial (pruned and failed ones never count); StageError when there is none."""
    try:
        return study.best_trial
    except ValueError:
        raise StageError(
            f"study {study.study_name!r} has no complete trial yet: run `medtune tune --trials N` first."
        ) from None


def apply_best(params_path: Path, study: optuna.Study) -> tuple[optuna.trial.FrozenTrial, dict[str, Any]]:
    """Write the best complete trial's values into params_path; (that trial, the values written)."""
    trial = best_trial(study)
    apply_overrides(params_path, dict(trial.params))
    return trial, dict(trial.params)


def describe(trial: optuna.trial.FrozenTrial, values: dict[str, Any], params_path: Path, metric: str) -> str:
    lines = [
        f"applied trial {trial.number} ({trial.user_attrs.get(EXP_ATTR, '?')}, "
        f"{metric} {trial.user_attrs.get(SCORE_ATTR, trial.value):.4g}) to {params_path}:"
    ]
    lines += [f"  {key}: {value!r}" for key, value in values.items()]
    return "\n".join(lines)
