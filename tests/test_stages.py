"""The stages run by DVC and the retrain workspace (lock, snapshot, undo) on their own, without Prefect.

undo_failed_run: the steps that fail are reported, never raised. The whole path (a real failed
retrain, restore, quarantine, failed event) runs against a Prefect server in test_flows.py; this
covers the failures it cannot provoke there.

The stages run by DVC (pipeline_stages, run_stage): a toy DVC project with real `dvc`, a second or
two per test. The pipeline flow built on them runs against a Prefect server in test_flows.py.
"""

import json
import logging
import sys
from pathlib import Path

import pytest
import yaml

from components import cli, lifetime
from components.common import StageError
from components.params import parse_params
from components.retrain import stages
from components.retrain import workspace as project
from tests.workspace import ROOT, run, tool_env


def test_undo_reports_failed_steps_keeps_the_evidence_and_never_raises(tmp_path):
    root = tmp_path / "project"  # not a git or DVC repository: every git/dvc step of restore fails
    (root / "reports").mkdir(parents=True)
    (root / "reports/validation.md").write_text("images_per_class_split failed\n")
    (root / project.SNAPSHOT_DIR).mkdir(parents=True)
    snap = {
        "raw_dir": "data/raw",
        "store": project.SNAPSHOT_DIR,
        "saved": [],
        "raw_existing": [],
        "outs": [{"path": "reports", "cached": False, "existed": True}],
    }
    good = tmp_path / "inbox/batch-a"
    good.mkdir(parents=True)
    (good / "labels.csv").write_text("path,label\n")
    gone = tmp_path / "inbox/batch-b"  # vanished before it could be moved: it cannot be quarantined

    restored, where = project.undo_failed_run(
        root,
        snap,
        [],
        parse_params({}),
        [str(good), str(gone)],
        "StageError: validate failed",
        tmp_path / "quarantine",
        {"flow_run_id": "run-1"},
    )

    assert any(line.startswith("FAILED to ") for line in restored), restored
    assert where[0]["batch"] == "batch-a" and where[1] == {"batch": "batch-b", "quarantine": None}
    q = tmp_path / "quarantine" / where[0]["quarantine"].rsplit("/", 1)[-1]
    report = json.loads((q / "report.json").read_text())
    assert report["flow_run_id"] == "run-1" and report["restored"] == restored
    assert report["failure"] == {"error": "StageError: validate failed", "batches_in_run": ["batch-a", "batch-b"]}
    # The failed run's reports travel with the batch; the working copies are gone.
    assert (q / "failed-run/reports/validation.md").read_text() == "images_per_class_split failed\n"
    assert (q / "batch/labels.csv").is_file() and not good.exists()
    assert not (root / project.SNAPSHOT_DIR).exists()
    assert not (root / (project.SNAPSHOT_DIR + "-failed-run")).exists()


# ---------------------------------------------------------------------------------------------
# The stages, run by DVC: a toy DVC project (real `dvc`, no Prefect), a second or two per test
# ---------------------------------------------------------------------------------------------

# `report` is listed first but reads what `make` writes: the order must come from DVC's graph.
TOY_DVC_YAML = """
stages:
  report:
    cmd: python report.py
    deps: [made.txt, report.py]
    outs: [report.txt]
  make:
    cmd: python make.py
    deps: [make.py]
    params: [n]
    outs: [made.txt]
  fail:
    cmd: python fail.py
    deps: [fail.py]
"""
TOY_MAKE = """
import logging, os, sys, time
import yaml
n = yaml.safe_load(open("params.yaml"))["n"]
print("making", n)  # a plain print: it reaches the log while the stage runs only if unbuffered
if os.environ.get("TOY_WAIT"):  # the test answers the line above with a file `go`
    deadline = time.monotonic() + 60
    while not os.path.exists("go") and time.monotonic() < deadline:
        time.sleep(0.05)
    if not os.path.exists("go"):
        print("error: nobody read 'making' while the stage was still running", file=sys.stderr)
        sys.exit(1)
logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
sys.stderr.write("progress 100%|#####|")  # a progress bar ends without a newline (tqdm)
sys.stderr.flush()
logging.getLogger("toy").warning("n is %s", n)
open("made.txt", "w").write(str(n))
"""
TOY_REPORT = "open('report.txt', 'w').write('report of ' + open('made.txt').read())\n"
TOY_FAIL = """
import os, sys
how = os.environ.get("TOY_FAIL", "error")
if how == "error":  # what a medtune stage prints for a StageError (common.run_cli)
    print("error: made.txt: 2 check(s) failed:\\n  - n is odd\\n  - n is small", file=sys.stderr)
    sys.exit(1)
if how == "oserror":
    raise OSError(5, "Input/output error")
raise FileNotFoundError(2, "No such file or directory", "missing.csv")
"""


class Lines(logging.Handler):
    """Collects (level, message); on the line `answer_to` writes `go`, which the toy stage waits for."""

    def __init__(self, root: Path, answer_to: str | None = None):
        super().__init__()
        self.root, self.answer_to, self.got = root, answer_to, []

    def emit(self, record: logging.LogRecord) -> None:
        self.got.append((record.levelno, record.getMessage()))
        if record.getMessage() == self.answer_to:
            (self.root / "go").write_text("")


def logger_for(handler: Lines) -> logging.Logger:
    lg = logging.getLogger(f"test-orchestrate-{id(handler)}")
    lg.setLevel(logging.DEBUG)
    lg.propagate = False
    lg.addHandler(handler)
    return lg


@pytest.fixture
def toy(tmp_path, monkeypatch):
    root = tmp_path / "toy"
    root.mkdir()
    (root / "dvc.yaml").write_text(TOY_DVC_YAML)
    (root / "params.yaml").write_text("n: 1\n")
    (root / "make.py").write_text(TOY_MAKE)
    (root / "report.py").write_text(TOY_REPORT)
    (root / "fail.py").write_text(TOY_FAIL)
    run(["dvc", "init", "--no-scm", "-q"], root, tool_env())
    # DVC runs `python ...` through a shell: the venv's python (it has yaml) first on PATH.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{tool_env()['PATH']}")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    return root


@pytest.mark.slow
def test_pipeline_stages_come_from_dvcs_graph_not_the_listing_order(toy):
    found = stages.pipeline_stages(toy)
    names = [s.name for s in found]
    assert names.index("make") < names.index("report"), names
    assert sorted(names) == ["fail", "make", "report"]
    report = found[names.index("report")]
    assert "made.txt" in report.deps and report.outs == ("report.txt",)


@pytest.mark.slow
def test_run_stage_streams_its_lines_while_it_runs_then_dvc_skips_it(toy, monkeypatch):
    monkeypatch.setenv("TOY_WAIT", "1")
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # run_stage must see to it itself
    lines = Lines(toy, answer_to="making 1")
    got = stages.run_stage("make", toy, logger_for(lines))
    # The stage waited for the test's answer to its first line, so that line was logged while it ran.
    assert got.outcome == "ran" and (toy / "made.txt").read_text() == "1", got.lines
    assert (logging.INFO, "making 1") in lines.got
    # The record logged right after a progress bar is a record of its own, at the stage's level.
    assert (logging.WARNING, "toy: n is 1") in lines.got, lines.got
    lock = yaml.safe_load((toy / "dvc.lock").read_text())
    assert lock["stages"]["make"]["params"]["params.yaml"] == {"n": 1}  # written by DVC

    again = Lines(toy)
    assert stages.run_stage("make", toy, logger_for(again)).outcome == "skipped"
    assert (logging.INFO, "Stage 'make' didn't change, skipping") in again.got
    assert not any(m == "making 1" for _, m in again.got), "an unchanged stage must not run"


@pytest.mark.slow
def test_run_stage_restores_from_dvcs_run_cache(toy):
    assert stages.run_stage("make", toy).outcome == "ran"
    (toy / "params.yaml").write_text("n: 2\n")
    assert stages.run_stage("make", toy).outcome == "ran"
    (toy / "params.yaml").write_text("n: 1\n")  # back to a run DVC has seen: restored, not run
    got = stages.run_stage("make", toy)
    assert got.outcome == "run-cache" and "making 1" not in got.lines, got.lines
    assert (toy / "made.txt").read_text() == "1"


@pytest.mark.slow
def test_a_failed_stage_raises_its_own_error(toy, monkeypatch):
    with pytest.raises(StageError) as err:
        stages.run_stage("fail", toy)
    text = str(err.value)
    assert "stage fail failed" in text and "dvc repro --single-item fail" in text
    assert "made.txt: 2 check(s) failed:\n  - n is odd\n  - n is small" in text, text
    assert "failed to reproduce" not in text  # DVC's summary after the stage's message is left out
    assert not stages.is_transient(err.value)

    monkeypatch.setenv("TOY_FAIL", "oserror")
    with pytest.raises(stages.TransientStageError, match=r"OSError: \[Errno 5\] Input/output error") as err:
        stages.run_stage("fail", toy)
    assert stages.is_transient(err.value)  # the pipeline flow retries it

    monkeypatch.setenv("TOY_FAIL", "missing")
    with pytest.raises(StageError, match="FileNotFoundError") as err:
        stages.run_stage("fail", toy)
    assert not stages.is_transient(err.value)


@pytest.mark.slow
def test_dvcs_lock_held_elsewhere_is_transient(toy):
    from dvc.repo import Repo

    with Repo(str(toy)) as repo, repo.lock:  # another DVC command in the workspace (DVC waits about 3 s)
        with pytest.raises(stages.TransientStageError, match="Unable to acquire lock") as err:
            stages.run_stage("make", toy)
    assert stages.is_transient(err.value)
    assert not (toy / "made.txt").exists()


@pytest.mark.slow
def test_a_stage_another_process_runs_is_refused_even_when_unchanged(toy):
    assert stages.run_stage("make", toy).outcome == "ran"
    with lifetime.stage_lock("make", toy, "medtune make (by hand)"):
        with pytest.raises(lifetime.StageBusy, match="stage make is already running"):
            stages.run_stage("make", toy)


@pytest.mark.slow
def test_unknown_stage_is_dvcs_error(toy):
    with pytest.raises(StageError, match="stage deploy failed .*deploy"):
        stages.run_stage("deploy", toy)


def test_the_pipeline_flow_refuses_a_params_file_dvc_would_ignore(tmp_path):
    stages.check_params_file(tmp_path, "params.yaml")
    stages.check_params_file(tmp_path, tmp_path / "params.yaml")
    with pytest.raises(StageError, match=r"params=params-strict.yaml: .*expected params.yaml"):
        stages.check_params_file(tmp_path, "params-strict.yaml")


def test_every_dvc_yaml_stage_is_a_medtune_stage_command():
    """dvc.yaml is the only list of stages; the CLI knows only which commands run one (to lock them)."""
    listed = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert {name: spec["cmd"] for name, spec in listed.items()} == {name: f"medtune {name}" for name in listed}
    assert set(listed) == cli.STAGE_COMMANDS
    assert not hasattr(stages, "STAGES") and not hasattr(cli, "STAGES")
