"""`medtune tune`: hyperparameter search over params.yaml's `tune.space`, each trial a DVC experiment.

    medtune tune --trials 20 --jobs 2   # 20 more trials, 2 at a time; prints the table of all trials
    medtune tune --apply                # the best complete trial's values into params.yaml
    dvc exp show --only-changed         # every trial, as DVC sees it (named tune-<study>-<n>)

Optuna's TPE (seeded by tune.seed) proposes each trial's values; they are checked as params, then run
as `dvc exp run --temp train -S key=value ...` (experiment.py), scored by tune.metric of the kept epoch
on the validation split (never test: the experiments stop at train), and pruned epoch by epoch from
inside the train stage when tune.prune (components/model/pruning.py). The study is kept in
.medtune/tune/<study>.db; the default study is named after HEAD's commit, so a search on the same
commit goes on where it stopped and a new commit starts a new one.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from components.common import StageError, run_cli, run_tool
from components.params import load_params
from components.tune import experiment, space, study
from components.tune.apply import apply_best, describe

log = logging.getLogger("medtune.tune")


PARAMS = "params.yaml"


def _head(root: Path) -> str:
    """HEAD's short commit hash: the default study name."""
    head = run_tool(["git", "rev-parse", "--short=7", "--verify", "-q", "HEAD"], root, check=False)
    if head.returncode != 0:
        raise StageError(f"{root}: not a git repository with a commit; trials are DVC experiments on HEAD.")
    return head.stdout.strip()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medtune tune", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, help="trials to run now (default: tune.trials; 0: none)")
    parser.add_argument("--jobs", type=int, help="trials at once (default: tune.jobs; 0: one per GPU or 4 cores)")
    parser.add_argument("--study", help="study name (default: HEAD's short commit hash)")
    parser.add_argument(
        "--apply",
        action="store_true",
        help="write the best complete trial's values into params.yaml (without "
        "--trials: no new trials, the study as it is)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def tune(root: Path, params_path: Path, trials: int, jobs: int, name: str) -> study.optuna.Study:
    """Run `trials` trials of study `name`, `jobs` at a time, in the DVC project at root."""
    from ruamel.yaml import YAML

    params = load_params(params_path)
    raw = YAML(typ="safe", pure=True).load(params_path.read_text()) or {}
    space.check_space(raw, params.tune.space)  # a bad range fails before any trial
    experiment.check_clean_base(root)
    if not experiment.has_lock(root):
        log.warning(
            "HEAD has no dvc.lock: every trial runs the whole pipeline up to %s. `dvc repro %s` and a commit "
            "of dvc.lock first let the trials share the stages before it.",
            experiment.STAGE,
            experiment.STAGE,
        )
    s = study.open_study(root, name, params)
    study.clear_killed(root, s)
    search = study.Search(
        root=root,
        study=s,
        storage_url=f"sqlite:///{study.study_path(root, name).resolve()}",
        raw=raw,
        params=params,
        devices=study.devices(jobs),
        threads=max(1, (os.cpu_count() or 1) // jobs),
    )
    log.info("study %s: %d trial(s), %d at a time, scored by %s", name, trials, jobs, params.tune.metric)
    study.run_trials(search, trials, jobs)
    return s


def main(argv: Sequence[str] | None = None) -> int:
    def run(args: argparse.Namespace) -> int:
        study.optuna.logging.set_verbosity(study.optuna.logging.WARNING)  # the table says what it would log
        # The project's params.yaml: the file `dvc exp run -S` sets and dvc.yaml's stages read.
        root, params_path = Path.cwd(), Path(PARAMS)
        if not params_path.is_file():
            raise StageError(f"{root}: no {PARAMS} here; run medtune tune from the DVC project's root.")
        params = load_params(params_path)
        name = args.study or _head(root)
        trials = args.trials if args.trials is not None else (0 if args.apply else params.tune.trials)
        jobs = args.jobs if args.jobs is not None else params.tune.jobs
        if trials < 0 or jobs < 0:
            raise ValueError(f"--trials {trials} / --jobs {jobs}: expected numbers >= 0")
        jobs = jobs or study.default_jobs()
        with study.study_lock(root, name):
            if trials:
                s = tune(root, params_path, trials, jobs, name)
            else:
                s = study.open_study(root, name, params, create=False)
        print(study.trial_table(s, list(params.tune.space), params.tune.metric))
        if args.apply:
            trial, values = apply_best(params_path, s)
            print(describe(trial, values, params_path, params.tune.metric))
        return 0

    return run_cli(_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
