"""The search space: params.yaml's `tune.space` as Optuna distributions, and a trial's values as
params (checked) and as `dvc exp run -S` flags.

    dists = distributions(params.tune.space)   # {"train.lr": FloatDistribution(1e-4, 1e-2, log=True), ...}
    values = suggest(trial, params.tune.space)  # {"train.lr": 0.0031, ...}, drawn by the study's sampler
    check_space(raw, params.tune.space)        # ValueError before any trial if a bound is not a valid value
    with_values(raw, {"train.lr": 0.003})      # the params a trial runs with (parse_params: ValueError)
    set_flags({"train.lr": 0.003})             # ["-S", "train.lr=0.003"]
"""

from __future__ import annotations

import copy
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from components.params import Params, SearchRange, parse_params
from components.presets import set_flags  # noqa: F401 - the one writer of `-S key=value` flags, re-exported


def distribution(r: SearchRange) -> BaseDistribution:
    """One range as Optuna's distribution: choices, whole numbers in [low, high], or reals (log or not)."""
    if r.choices is not None:
        return CategoricalDistribution(r.choices)
    if r.int:
        return IntDistribution(int(r.low), int(r.high), log=r.log)
    return FloatDistribution(r.low, r.high, log=r.log)


def distributions(space: dict[str, SearchRange]) -> dict[str, BaseDistribution]:
    return {key: distribution(r) for key, r in space.items()}


def suggest(trial: Any, space: dict[str, SearchRange]) -> dict[str, Any]:
    """A trial's values, one per dotted key, drawn by the study's sampler from `distribution(range)`."""
    values = {}
    for key, r in space.items():
        d = distribution(r)
        if isinstance(d, CategoricalDistribution):
            values[key] = trial.suggest_categorical(key, d.choices)
        elif isinstance(d, IntDistribution):
            values[key] = trial.suggest_int(key, d.low, d.high, log=d.log)
        else:
            values[key] = trial.suggest_float(key, d.low, d.high, log=d.log)
    return values


def with_values(raw: dict[str, Any], values: dict[str, Any]) -> Params:
    """params.yaml's contents (`raw`) with the dotted keys of `values` set, as checked Params; ValueError
    (from parse_params: key, value, what was expected) when they are not valid together."""
    out = copy.deepcopy(raw)
    for key, value in values.items():
        section, _, name = key.partition(".")
        out.setdefault(section, {})
        if out[section] is None:
            out[section] = {}
        out[section][name] = value
    return parse_params(out)


def bounds(r: SearchRange) -> list[Any]:
    """The values a range can reach at its edges: each choice, or low and high (whole numbers with int)."""
    if r.choices is not None:
        return list(r.choices)
    return [int(r.low), int(r.high)] if r.int else [r.low, r.high]


def check_space(raw: dict[str, Any], space: dict[str, SearchRange]) -> None:
    """Every edge value of every range, set alone into params.yaml, must be valid params: a range
    reaching an invalid value (train.dropout up to 1, train.epochs from 0) fails here, before any trial,
    naming tune.space's key and the value."""
    problems = []
    for key, r in space.items():
        if r.int and r.choices is None and (r.low != int(r.low) or r.high != int(r.high)):
            problems.append(f"tune.space.{key}: low/high {r.low}, {r.high} with int: true; expected whole numbers")
            continue
        for value in bounds(r):
            try:
                with_values(raw, {key: value})
            except ValueError as exc:
                reason = " ".join(line.removeprefix("params: ") for line in str(exc).splitlines())
                problems.append(f"tune.space.{key} reaches {value!r}, which is not a valid value: {reason}")
    if problems:
        raise ValueError("\n".join(problems))
