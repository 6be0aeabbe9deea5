"""orchestrate.undo_failed_run on its own: the steps that fail are reported, never raised.

The whole path (a real failed retrain, restore, quarantine, failed event) runs against a Prefect
server in test_flows.py; this covers the failures it cannot provoke there.
"""

import json

from components import orchestrate
from components.params import parse_params


def test_undo_reports_failed_steps_keeps_the_evidence_and_never_raises(tmp_path):
    root = tmp_path / "project"  # not a git or DVC repository: every git/dvc step of restore fails
    (root / "reports").mkdir(parents=True)
    (root / "reports/validation.md").write_text("images_per_class_split failed\n")
    (root / orchestrate.SNAPSHOT_DIR).mkdir(parents=True)
    snap = {"raw_dir": "data/raw", "store": orchestrate.SNAPSHOT_DIR, "saved": [], "raw_existing": [],
            "outs": [{"path": "reports", "cached": False, "existed": True}]}
    good = tmp_path / "inbox/batch-a"
    good.mkdir(parents=True)
    (good / "labels.csv").write_text("path,label\n")
    gone = tmp_path / "inbox/batch-b"  # vanished before it could be moved: it cannot be quarantined

    restored, where = orchestrate.undo_failed_run(
        root, snap, [], parse_params({}), [str(good), str(gone)], "StageError: validate failed",
        tmp_path / "quarantine", {"flow_run_id": "run-1"})

    assert any(line.startswith("FAILED to ") for line in restored), restored
    assert where[0]["batch"] == "batch-a" and where[1] == {"batch": "batch-b", "quarantine": None}
    q = tmp_path / "quarantine" / where[0]["quarantine"].rsplit("/", 1)[-1]
    report = json.loads((q / "report.json").read_text())
    assert report["flow_run_id"] == "run-1" and report["restored"] == restored
    assert report["failure"] == {"error": "StageError: validate failed", "batches_in_run": ["batch-a", "batch-b"]}
    # The failed run's reports travel with the batch; the working copies are gone.
    assert (q / "failed-run/reports/validation.md").read_text() == "images_per_class_split failed\n"
    assert (q / "batch/labels.csv").is_file() and not good.exists()
    assert not (root / orchestrate.SNAPSHOT_DIR).exists()
    assert not (root / (orchestrate.SNAPSHOT_DIR + "-failed-run")).exists()
