"""medtune tune: the search space mapping, the pruning hook inside training, and a real search whose
trials are DVC experiments in a temporary git+DVC project."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import optuna
import pytest
import torch
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from components.common import StageError
from components.model import pruning
from components.model.fit import Run, fit
from components.params import SearchRange, parse_params
from components.tune import experiment, search, space, study
from components.tune.apply import apply_best
from tests.workspace import make_workspace, run

# -- the space --------------------------------------------------------------------------------------


def test_ranges_map_to_optuna_distributions():
    dists = space.distributions(
        {
            "train.lr": SearchRange(low=1e-4, high=1e-2, log=True),
            "train.epochs": SearchRange(low=2, high=6, int=True),
            "train.backbone": SearchRange(choices=["none", "resnet18"]),
            "train.dropout": SearchRange(low=0.0, high=0.5),
        }
    )
    assert dists == {
        "train.lr": FloatDistribution(1e-4, 1e-2, log=True),
        "train.epochs": IntDistribution(2, 6),
        "train.backbone": CategoricalDistribution(["none", "resnet18"]),
        "train.dropout": FloatDistribution(0.0, 0.5),
    }


def test_a_trials_values_become_checked_params_and_dvc_flags():
    values = space.suggest(
        optuna.trial.FixedTrial({"train.lr": 3e-05, "train.epochs": 4, "train.backbone": "none"}),
        {
            "train.lr": SearchRange(low=1e-5, high=1e-2, log=True),
            "train.epochs": SearchRange(low=2, high=6, int=True),
            "train.backbone": SearchRange(choices=["none", "resnet18"]),
        },
    )
    p = space.with_values({"train": {"lr": 0.1}}, values)
    assert (p.train.lr, p.train.epochs, p.train.backbone) == (3e-05, 4, "none")
    assert space.set_flags(values) == [
        "-S",
        "train.lr=3e-05",
        "-S",
        "train.epochs=4",
        "-S",
        'train.backbone="none"',
    ]
    # Values valid alone but not together (a warm-up as long as the training) fail as params do.
    with pytest.raises(ValueError, match="train.warmup_epochs"):
        space.with_values({}, {"train.epochs": 2, "train.warmup_epochs": 2.0})


def test_a_range_reaching_an_invalid_value_fails_before_any_trial():
    bad = {
        "train.dropout": SearchRange(low=0.0, high=1.0),  # dropout < 1
        "train.optimizer": SearchRange(choices=["adamw", "adam"]),  # no such optimizer
        "train.lr": SearchRange(low=1e-4, high=1e-2, log=True),  # fine
    }
    with pytest.raises(ValueError) as err:
        space.check_space({}, bad)
    message = str(err.value)
    assert "tune.space.train.dropout reaches 1.0" in message
    assert "tune.space.train.optimizer reaches 'adam'" in message
    assert "train.lr" not in message


# -- the pruning hook -------------------------------------------------------------------------------


def _study_with_two_good_trials(tmp_path, prune=True, metric="val_loss"):
    """A study whose two complete trials reached val_loss 0.3 at epochs 1 and 2, and a running third."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    s = optuna.create_study(study_name="s", storage=pruning.storage(url), pruner=pruning.make_pruner(prune))
    s.set_user_attr(pruning.METRIC_ATTR, metric)
    s.set_user_attr(pruning.PRUNE_ATTR, prune)
    for _ in range(2):
        t = s.ask()
        for epoch in (1, 2):
            t.report(0.3, epoch)
        s.tell(t, 0.3)
    return url, s, s.ask()


def _name_trial(monkeypatch, url, trial):
    monkeypatch.setenv(pruning.STORAGE_ENV, url)
    monkeypatch.setenv(pruning.STUDY_ENV, "s")
    monkeypatch.setenv(pruning.TRIAL_ENV, str(trial.number))


def test_the_hook_prunes_a_trial_worse_than_the_median(tmp_path, monkeypatch):
    url, s, good = _study_with_two_good_trials(tmp_path)
    _name_trial(monkeypatch, url, good)
    # Optuna compares a trial's best value so far with the other trials' median at that epoch.
    assert pruning.should_stop({"epoch": 1, "val_loss": 0.2}) is False
    assert pruning.should_stop({"epoch": 2, "val_loss": 0.9}) is False  # its best, 0.2, still beats 0.3
    bad = s.ask()
    _name_trial(monkeypatch, url, bad)
    assert pruning.should_stop({"epoch": 1, "val_loss": float("nan")}) is False  # no evidence: not reported
    assert pruning.should_stop({"epoch": 1, "val_loss": 0.9}) is True
    stored = s.get_trials(deepcopy=False)
    assert stored[good.number].intermediate_values == {1: 0.2, 2: 0.9}
    assert pruning.PRUNED_ATTR not in stored[good.number].user_attrs
    assert stored[bad.number].intermediate_values == {1: 0.9}
    assert stored[bad.number].user_attrs[pruning.PRUNED_ATTR] == 1


def test_data_parallel_training_reports_from_rank_0_and_is_never_pruned(tmp_path, monkeypatch):
    url, s, trial = _study_with_two_good_trials(tmp_path)
    _name_trial(monkeypatch, url, trial)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert pruning.should_stop({"epoch": 1, "val_loss": 7.0}) is False
    assert s.get_trials(deepcopy=False)[trial.number].intermediate_values == {}
    monkeypatch.setenv("RANK", "0")
    assert pruning.should_stop({"epoch": 1, "val_loss": 9.0}) is False  # worse than the median, yet goes on
    assert s.get_trials(deepcopy=False)[trial.number].intermediate_values == {1: 9.0}


def test_the_hook_only_reports_when_the_study_says_no_pruning(tmp_path, monkeypatch):
    url, s, trial = _study_with_two_good_trials(tmp_path, prune=False)
    _name_trial(monkeypatch, url, trial)
    assert pruning.should_stop({"epoch": 1, "val_loss": 50.0}) is False
    assert s.get_trials(deepcopy=False)[trial.number].intermediate_values == {1: 50.0}


def test_without_a_named_trial_the_hook_does_nothing_and_imports_no_optuna():
    code = (
        "import sys; from components.model import pruning; "
        "print(pruning.should_stop({'epoch': 1, 'val_loss': 9.0}), 'optuna' in sys.modules)"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MEDTUNE_TUNE_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.slow  # a (tiny) training run
def test_a_pruned_training_stops_like_early_stopping(tmp_path, monkeypatch):
    # fit's epoch loop asks the hook: the study's two trials reached val_loss 0.3; a random network on
    # random images is far worse at epoch 1, so training stops there and keeps that epoch.
    url, s, trial = _study_with_two_good_trials(tmp_path)
    _name_trial(monkeypatch, url, trial)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 1, 16, 16), dtype=np.uint8)
    y = np.array([0, 1] * 8)
    params = parse_params({"train": {"backbone": "none", "pretrained": False, "epochs": 4, "batch_size": 8}})
    result = fit(Run(x, y, x[:8], y[:8], params, torch.device("cpu"), False), seed=0)
    assert result["epochs_run"] == 1 and result["best_epoch"] == 1 and result["state"] is not None
    assert s.get_trials(deepcopy=False)[trial.number].user_attrs[pruning.PRUNED_ATTR] == 1


def test_a_search_needs_a_clean_base(tmp_path):
    repo = tmp_path / "p"
    (repo / "components").mkdir(parents=True)
    (repo / "params.yaml").write_text("train: {lr: 0.001}\n")
    (repo / "notes.txt").write_text("mine\n")
    run(["git", "init", "-q"], repo)
    with pytest.raises(StageError, match="no git commit yet"):
        experiment.check_clean_base(repo)
    run(["git", "add", "params.yaml"], repo)
    run(["git", "commit", "-qm", "base"], repo)
    experiment.check_clean_base(repo)  # an untracked file outside the code is no part of any trial
    (repo / "params.yaml").write_text("train: {lr: 0.002}\n")
    (repo / "components" / "new.py").write_text("")
    with pytest.raises(StageError, match=r"uncommitted changes \(params.yaml, components/new.py\).*commit the"):
        experiment.check_clean_base(repo)


def test_pruned_and_failed_trials_are_recorded_and_never_applied(tmp_path, monkeypatch):
    # Experiments stubbed: trial 1's train is pruned by the hook (it writes pruned_at_epoch into the
    # study from its own process), trial 2's dvc exp run fails. Trial 1 scored best, yet --apply takes 0.
    params = parse_params({"tune": {"space": {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}}}})
    s = study.open_study(tmp_path, "s", params)
    url = f"sqlite:///{study.study_path(tmp_path, 's').resolve()}"

    def run_trial(root, name, flags, env, log):
        number = int(env[pruning.TRIAL_ENV])
        assert name == f"tune-s-{number}" and flags[0] == "-S" and flags[1].startswith("train.lr=")
        if number == 1:
            store = pruning.storage(env[pruning.STORAGE_ENV])
            trial_id = store.get_trial_id_from_study_id_trial_number(store.get_study_id_from_name("s"), number)
            store.set_trial_user_attr(trial_id, pruning.PRUNED_ATTR, 1)
        if number == 2:
            raise StageError(f"trial {name}: dvc exp run exited 1")

    monkeypatch.setattr(experiment, "run_trial", run_trial)
    monkeypatch.setattr(experiment, "check_clean_base", lambda root: None)
    monkeypatch.setattr(
        experiment, "live_metrics", lambda root, name: {"step": 2, "val": {"loss": 0.5 - name.count("-1")}}
    )
    searching = study.Search(tmp_path, s, url, {}, params, study.devices(1), threads=1)
    study.run_trials(searching, 3, 1)
    states = [t.state.name for t in s.get_trials()]
    assert states == ["COMPLETE", "PRUNED", "FAIL"]
    table = study.trial_table(s, ["train.lr"], "val_loss").splitlines()
    assert table[0].split() == ["trial", "experiment", "train.lr", "val_loss", "epochs", "state"]
    assert table[1].startswith("0*") and table[2].split()[-3:] == ["-0.5", "2", "PRUNED"]
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.003  # the step size\n")
    trial, values = apply_best(tmp_path / "params.yaml", s)
    assert trial.number == 0 and values == {"train.lr": s.trials[0].params["train.lr"]}
    text = (tmp_path / "params.yaml").read_text()
    assert text.startswith(f"train:\n  lr: {values['train.lr']}") and text.endswith(" # the step size\n")
    assert "dvc exp run exited 1" in s.trials[2].user_attrs["error"]


def _dvc_run_record(root, name, status, copy):
    """A run record as `dvc exp run --temp` keeps it in .dvc/tmp/exps/run/ while it runs."""
    record = root / ".dvc" / "tmp" / "exps" / "run" / name / f"{name}.run"
    record.parent.mkdir(parents=True)
    info = {"git_url": f"file://{copy}", "baseline_rev": "0" * 40, "location": "tempdir", "root_dir": str(copy)}
    record.write_text(json.dumps({**info, "dvc_dir": ".dvc", "name": name, "wdir": ".", "status": status}))
    return record


def test_what_a_killed_search_left_is_cleared_by_the_next(tmp_path):
    with study.study_lock(tmp_path, "s"):
        with pytest.raises(StageError, match="another medtune tune"), study.study_lock(tmp_path, "s"):
            pass
        s = study.open_study(tmp_path, "s", parse_params({}))
        done = s.ask()
        s.ask()  # left RUNNING by the kill
        s.tell(done, 0.5)
        copies = {n: tmp_path / ".dvc" / "tmp" / "exps" / "standalone" / n for n in ("a", "b", "c")}
        for copy in copies.values():
            copy.mkdir(parents=True)
        stale = _dvc_run_record(tmp_path, "tune-s-1", 2, copies["a"])  # killed while running
        other = _dvc_run_record(tmp_path, "mine-1", 2, copies["b"])  # someone's own dvc exp run --temp
        finished = _dvc_run_record(tmp_path, "tune-s-0", 6, copies["c"])
        study.clear_killed(tmp_path, s)
        states = [t.state for t in s.get_trials()]
        assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
        assert not stale.parent.exists() and not copies["a"].exists()
        assert other.exists() and copies["b"].exists() and finished.exists() and copies["c"].exists()
    assert (tmp_path / ".medtune" / ".gitignore").read_text() == "*\n"


# -- a real search ----------------------------------------------------------------------------------

SPACE = {"train.lr": {"low": 0.001, "high": 0.01, "log": True}, "train.dropout": {"choices": [0.0, 0.25]}}


def _experiments(ws) -> dict[str, dict]:
    """`dvc exp show --json`: each experiment's name -> its data (params, metrics)."""
    found: dict[str, dict] = {}

    def walk(node):
        if isinstance(node, dict):
            if node.get("name") and isinstance(node.get("data"), dict):
                found[node["name"]] = node["data"]
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(run(["dvc", "exp", "show", "--json"], ws).stdout))
    return found


@pytest.mark.slow
def test_trials_are_dvc_experiments_scored_on_val_and_the_best_is_applied(tmp_path, monkeypatch, capsys):
    ws = make_workspace(tmp_path / "ws", patients=8)
    p = yaml.safe_load((ws / "params.yaml").read_text())
    p["tune"]["space"] = SPACE
    (ws / "params.yaml").write_text("# the project's own comment\n" + yaml.safe_dump(p, sort_keys=False))
    run(["dvc", "repro", "preprocess"], ws)  # what every trial shares, in HEAD's dvc.lock
    run(["git", "add", "-A"], ws)
    run(["git", "commit", "-qm", "base"], ws)

    out = run(["medtune", "tune", "--trials", "2", "--jobs", "2", "--study", "t"], ws)
    assert run(["git", "status", "--porcelain"], ws).stdout == ""  # the trials never touched the workspace

    s = optuna.load_study(study_name="t", storage=f"sqlite:///{study.study_path(ws, 't')}")
    trials = s.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    exps = _experiments(ws)
    for t in trials:
        name = f"tune-t-{t.number}"
        assert name in out.stdout
        data = exps[name]
        train = data["params"]["params.yaml"]["data"]["train"]
        assert (train["lr"], train["dropout"]) == (t.params["train.lr"], t.params["train.dropout"])
        metrics = data["metrics"]
        # Scored by the kept epoch's validation loss; evaluate (test metrics) never ran.
        assert t.value == metrics["dvclive/metrics.json"]["data"]["val"]["loss"]
        assert "data" not in metrics.get("reports/metrics.json", {})
        lock = yaml.safe_load(run(["git", "show", f"{data['rev']}:dvc.lock"], ws).stdout)["stages"]
        assert "train" in lock and "evaluate" not in lock

    monkeypatch.chdir(ws)
    assert search.main(["--apply", "--study", "t"]) == 0
    best = s.best_trial
    assert f"applied trial {best.number} (tune-t-{best.number}" in capsys.readouterr().out
    text = (ws / "params.yaml").read_text()
    assert text.startswith("# the project's own comment\n")
    written = yaml.safe_load(text)["train"]
    assert (written["lr"], written["dropout"]) == (best.params["train.lr"], best.params["train.dropout"])
    diff = json.loads(run(["dvc", "params", "diff", "--json"], ws).stdout)["params.yaml"]
    assert (diff["train.lr"]["old"], diff["train.lr"]["new"]) == (0.003, best.params["train.lr"])
