"""Registry and promotion on a real git + DVC repository (local directory remote) with real ONNX models.

The two models are tiny real ONNX graphs (exported from torch, run by ONNX Runtime): "good" says
lesion when the image is bright, "bad" says the opposite. The test images are bright for lesions.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components import common
from components.params import parse_params
from components.release import registry
from components.retrain import challenger, dvc_project, promote, salt_guard

BIN = Path(sys.executable).parent
# The tiny test graphs use the legacy exporter (no onnxscript needed); its deprecation notice is noise here.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
    "DVC_NO_ANALYTICS": "1",
}


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")


def sh(cwd: Path, *cmd: str) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, f"{cmd}: {out.stderr}"
    return out.stdout.strip()


def export_onnx(path: Path, sign: float) -> None:
    import torch

    class Bright(torch.nn.Module):
        def forward(self, x):
            m = x.mean(dim=(1, 2, 3))[:, None] - 0.5
            return torch.softmax(torch.cat([-sign * 20 * m, sign * 20 * m], dim=1), dim=1)

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        Bright(),
        torch.zeros(2, 1, 8, 8),
        str(path),
        input_names=["image"],
        output_names=["probabilities"],
        dynamic_axes={"image": {0: "batch"}},
        dynamo=False,
    )


def test_onnx_probabilities_return_the_threshold_the_model_records(tmp_path):
    import onnx

    path = tmp_path / "model.onnx"
    export_onnx(path, 1.0)
    images = np.stack([np.zeros((1, 8, 8), np.uint8), np.full((1, 8, 8), 255, np.uint8)])
    probs, threshold = challenger.onnx_probabilities(path, images, 0.5)
    assert threshold == 0.5  # no metadata: the params threshold
    assert probs.shape == (2, 2) and probs[0, 1] < 0.01 and probs[1, 1] > 0.99
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {"metrics": json.dumps({"threshold": 0.27})})
    onnx.save(proto, str(path))
    assert challenger.onnx_probabilities(path, images, 0.5)[1] == 0.27


def mid(name: str) -> str:
    """The model id of the test checkpoint `name` (write_challenger's content)."""
    return hashlib.sha256(f"checkpoint {name}".encode()).hexdigest()[:12]


A, B, C, D, E = (mid(n) for n in "abcde")
PARAMS = parse_params({"evaluate": {"bootstrap": 20, "positive_class": "lesion"}})


def write_prepared(ws: Path, patients: list[str]) -> None:
    """A test split: per patient one dark (normal) and one bright (lesion) 8x8 image."""
    imgs, rows = [], []
    for i, p in enumerate(patients):
        for j, (label, value) in enumerate((("normal", 40), ("lesion", 220))):
            imgs.append(np.full((1, 8, 8), value, np.uint8))
            rows.append(
                {
                    "split": "test",
                    "row": len(rows),
                    "path": f"{label}/{p}_{j}.png",
                    "sha256": f"{i}{j}",
                    "label": label,
                    "label_index": j,
                    "patient": p,
                }
            )
    d = ws / "data/prepared"
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "test.npy", np.stack(imgs))
    pd.DataFrame(rows).to_csv(d / "index.csv", index=False)


def write_challenger(
    ws: Path, name: str, sign: float, gate_passed: bool = True, manifest_rows: list[dict] | None = None
) -> str:
    """What the pipeline leaves behind: reports, models/ (checkpoint, ONNX, lineage, card), data/manifest.csv.

    Returns the model id (sha256 of the checkpoint, first 12 hex), as the export stage computes it.
    """
    (ws / "models").mkdir(parents=True, exist_ok=True)
    (ws / "models/model.pt").write_bytes(f"checkpoint {name}".encode())
    model_id = common.sha256_file(ws / "models/model.pt")[:12]
    from components.data.preprocess import load_split
    from components.model.metrics import compute_metrics

    export_onnx(ws / "models/model.onnx", sign)
    images, index = load_split(ws / "data/prepared", "test")
    probs, _ = challenger.onnx_probabilities(ws / "models/model.onnx", images, 0.5)
    metrics = compute_metrics(index["label_index"].to_numpy(), probs, ["normal", "lesion"], 1, 0.5, 20, 0)
    common.write_json(ws / "reports/evaluation.json", metrics)  # the record evaluate writes
    common.write_json(
        ws / "reports/gate.json",
        {"passed": gate_passed, "reasons": ["test gate"], "failed": [] if gate_passed else ["auroc too low"]},
    )
    common.write_json(ws / "models/lineage.json", {"model_id": model_id})
    common.write_text(ws / "models/model_card.md", f"# model {model_id}\n")
    rows = manifest_rows or [{"path": "a.png", "sha256": "x", "label": "normal", "patient": "pX", "split": "train"}]
    pd.DataFrame(rows).to_csv(ws / "data/manifest.csv", index=False)
    return model_id


@pytest.fixture()
def repo(tmp_path):
    ws = tmp_path / "ws"
    (ws / "data/raw").mkdir(parents=True)
    (ws / "data/raw/a.txt").write_text("scan")
    sh(ws, "git", "init", "-q")
    sh(ws, "dvc", "init", "-q")
    sh(ws, "dvc", "add", "-q", "data/raw")
    (ws / ".gitignore").write_text("/models/\n/reports/\n/data/prepared\n/data/manifest.csv\n")
    sh(ws, "git", "add", "-A")
    sh(ws, "git", "commit", "-qm", "init")
    write_prepared(ws, ["p1", "p2", "p3", "p4"])
    return ws


def promote_first(ws: Path, remote: Path) -> dict:
    write_challenger(ws, "a", +1)
    decision = challenger.compare(ws, PARAMS, "auroc", 0.01)
    return promote.publish(
        ws, decision, trigger="event", flow_run_id="run-1", data_version="v1", remote_url=str(remote)
    )


@pytest.mark.slow
def test_first_model_that_passes_the_gate_is_promoted_tagged_and_pushed(repo, tmp_path):
    rec = promote_first(repo, tmp_path / "remote")
    assert rec["event"] == "promoted" and rec["git_tag"] == f"model-{A}"
    assert "no champion yet" in " ".join(rec["reasons"])
    assert registry.current(repo) == {"model_id": A, "git_tag": f"model-{A}"}
    assert [r["event"] for r in registry.releases(repo)] == ["promoted"]
    assert sh(repo, "git", "tag", "--list") == f"model-{A}"
    committed = sh(repo, "git", "show", "--name-only", "--format=", f"model-{A}").splitlines()
    for f in (
        "registry/current.json",
        "registry/releases.jsonl",
        f"registry/models/{A}/lineage.json",
        f"registry/models/{A}/manifest.csv",
        f"registry/models/{A}/model_card.md",
        ".dvc/config",
    ):
        assert f in committed, f
    assert f"registry/models/{A}/model.onnx" not in committed  # models live in DVC, not git
    assert (repo / f"registry/models/{A}/model.onnx").is_file()
    assert sh(repo, "git", "status", "--porcelain", "--untracked-files=no") == ""
    assert any((tmp_path / "remote").rglob("*")), "dvc push to the local remote"


@pytest.mark.slow
def test_worse_challenger_is_rejected_and_the_champion_stays(repo, tmp_path):
    promote_first(repo, tmp_path / "remote")
    tags = sh(repo, "git", "tag", "--list")
    write_challenger(repo, "b", -1)  # passes the (test) gate, but is worse than the champion
    decision = challenger.compare(repo, PARAMS, "auroc", 0.01)
    assert decision["promote"] is False
    assert any("worse than champion" in r for r in decision["reasons"]), decision["reasons"]
    assert decision["champion"]["metrics"]["auroc"] == 1.0
    assert decision["comparison"]["challenger"]["auroc"] == 0.0
    rec = promote.publish(repo, decision, trigger="schedule", flow_run_id="run-2", data_version="v2")
    assert rec["event"] == "rejected" and rec["git_tag"] is None
    assert rec["champion"]["metrics"]["auroc"] == 1.0 and rec["challenger"]["model_id"] == B
    assert registry.current(repo)["model_id"] == A
    assert sh(repo, "git", "tag", "--list") == tags
    assert not (repo / f"registry/models/{B}").exists()
    assert [r["event"] for r in registry.releases(repo)] == ["promoted", "rejected"]


@pytest.mark.slow
def test_equal_challenger_within_margin_is_promoted(repo, tmp_path):
    promote_first(repo, tmp_path / "remote")
    write_challenger(repo, "c", +1)
    decision = challenger.compare(repo, PARAMS, "auroc", 0.01)
    assert decision["promote"] is True, decision["reasons"]
    rec = promote.publish(repo, decision, trigger="event", flow_run_id="run-3", data_version="v3")
    assert registry.current(repo) == {"model_id": C, "git_tag": rec["git_tag"]}


@pytest.mark.slow
def test_gate_failure_rejects_even_without_champion(repo):
    write_challenger(repo, "d", +1, gate_passed=False)
    decision = challenger.compare(repo, PARAMS, "auroc", 0.01)
    assert decision["promote"] is False
    assert decision["reasons"][0].startswith("challenger failed the absolute gate")


@pytest.mark.slow
def test_comparison_leaves_out_patients_the_champion_trained_on(repo, tmp_path):
    write_challenger(
        repo,
        "a",
        +1,
        manifest_rows=[
            {"path": "x.png", "sha256": "1", "label": "normal", "patient": "p1", "split": "train"},
            {"path": "y.png", "sha256": "2", "label": "normal", "patient": "p2", "split": "val"},
            {"path": "z.png", "sha256": "3", "label": "normal", "patient": "p3", "split": "test"},
        ],
    )
    promote.publish(
        repo,
        challenger.compare(repo, PARAMS, "auroc", 0.01),
        trigger="manual",
        flow_run_id=None,
        data_version="v1",
        remote_url=str(tmp_path / "remote"),
    )
    write_challenger(repo, "e", +1)
    decision = challenger.compare(repo, PARAMS, "auroc", 0.01)
    assert decision["comparison"]["n_test"] == 8
    assert decision["comparison"]["n_compared"] == 4  # p3 and p4 only: p1/p2 were champion train/val
    assert decision["comparison"]["excluded_champion_train_patients"] == 4


@pytest.mark.slow
def test_recover_undoes_an_uncommitted_promotion_and_finishes_a_missing_tag(repo, tmp_path):
    promote_first(repo, tmp_path / "remote")
    before = (repo / "registry/releases.jsonl").read_text()
    # A crash after writing the new records but before the git commit:
    registry.record_release(repo, {"event": "promoted", "model_id": "ffffffffffff", "trigger": "event"})
    registry.set_current(repo, "ffffffffffff", "model-ffffffffffff")
    sh(repo, "git", "tag", "-d", f"model-{A}")  # and a crash between commit and tag, earlier
    done = promote.recover(repo)
    assert len(done) == 3, done
    assert registry.current(repo)["model_id"] == A
    assert (repo / "registry/releases.jsonl").read_text() == before
    assert sh(repo, "git", "tag", "--list") == f"model-{A}"
    assert promote.recover(repo) == []


@pytest.mark.slow
def test_recover_removes_an_uncommitted_first_promotion(repo):
    registry.set_current(repo, "ffffffffffff", "model-ffffffffffff")
    assert promote.recover(repo) and registry.current(repo) is None


@pytest.mark.slow
def test_release_records_are_validated_and_appended(repo):
    with pytest.raises(ValueError, match="promoted, rejected, rollback, failed"):
        registry.record_release(repo, {"event": "deleted", "model_id": "x", "trigger": "manual"})
    a = registry.record_release(repo, {"event": "rollback", "model_id": "a", "trigger": "manual"})
    first = (repo / "registry/releases.jsonl").read_text()
    registry.record_release(repo, {"event": "rejected", "model_id": "b", "trigger": "schedule"})
    assert (repo / "registry/releases.jsonl").read_text().startswith(first)
    assert [r["model_id"] for r in registry.releases(repo)] == ["a", "b"] and a["time"]


@pytest.mark.slow
def test_a_failed_run_is_recorded_in_a_commit_of_its_own(repo, tmp_path):
    promote_first(repo, tmp_path / "remote")
    head = sh(repo, "git", "rev-parse", "HEAD")
    (repo / "notes.txt").write_text("someone else's work")
    sh(repo, "git", "add", "notes.txt")  # staged by someone else: must not ride along
    rec = promote.record_failure(
        repo,
        error="StageError: stage validate failed (exit 1): too few images",
        trigger="schedule",
        flow_run_id="run-2",
        data_version="v1",
        batches=[{"batch": "b1", "quarantine": "data/quarantine/b1-x"}],
        restored=["dvc status: Data and pipelines are up to date."],
    )
    assert rec["event"] == "failed" and rec["model_id"] is None and rec["champion"]["model_id"] == A
    assert sh(repo, "git", "diff", "--name-only", head, "HEAD") == "registry/releases.jsonl"
    assert sh(repo, "git", "diff", "--cached", "--name-only") == "notes.txt"
    last = registry.releases(repo)[-1]
    assert last["event"] == "failed" and "too few images" in last["reasons"][0] and last["batches"][0]["batch"] == "b1"
    assert registry.current(repo)["model_id"] == A and promote.recover(repo) == []


@pytest.mark.slow
def test_champion_with_other_input_shape_is_not_compared(repo, tmp_path):
    promote_first(repo, tmp_path / "remote")
    write_prepared(repo, ["p1", "p2"])
    d = repo / "data/prepared"
    np.save(d / "test.npy", np.zeros((4, 1, 16, 16), np.uint8))  # as if image_size changed
    (repo / "models/model.onnx").unlink()
    (repo / "models/model.pt").write_bytes(b"checkpoint g")
    common.write_json(repo / "models/lineage.json", {"model_id": mid("g")})
    export_onnx(repo / "models/model.onnx", +1)
    decision = challenger.compare(repo, PARAMS, "auroc", 0.01)
    assert decision["promote"] is False
    assert any("cannot compare" in r and "expects input" in r for r in decision["reasons"]), decision["reasons"]


@pytest.mark.slow
def test_stale_onnx_of_an_earlier_run_does_not_stand_in_for_the_challenger(repo, tmp_path):
    promote_first(repo, tmp_path / "remote")  # leaves models/model.onnx + lineage.json of model A
    (repo / "models/model.pt").write_bytes(b"checkpoint x")  # a new checkpoint that export did not take
    decision = challenger.compare(repo, PARAMS, "auroc", 0.01)
    assert decision["promote"] is False
    assert decision["challenger"]["model_id"] == mid("x")
    assert any("has no exported model" in r for r in decision["reasons"]), decision["reasons"]


# ---------------------------------------------------------------------------------------------
# A release interrupted at any step is finished by recover(), never half-made
# ---------------------------------------------------------------------------------------------


class Killed(BaseException):
    """Stands for the process dying: no `except Exception` in the code under test catches it."""


def _kill_after(monkeypatch, step: str) -> None:
    """Make `promote.<function> [args...]` (e.g. "git commit") raise Killed right after it ran."""
    name, *words = step.split()
    real = getattr(promote, name)

    def killing(*args, **kwargs):
        out = real(*args, **kwargs)
        if list(args[1 : 1 + len(words)]) == words:
            raise Killed(step)
        return out

    monkeypatch.setattr(promote, name, killing)


def _batch(ws: Path) -> Path:
    batch = ws / "data/inbox/b1"
    batch.mkdir(parents=True)
    (batch / "scan.png").write_bytes(b"not really a scan")
    return batch


def _publish(ws: Path, remote: Path, batch: Path, flow_run_id: str = "run-1") -> dict:
    decision = challenger.compare(ws, PARAMS, "auroc", 0.01)
    return promote.publish(
        ws,
        decision,
        trigger="event",
        flow_run_id=flow_run_id,
        data_version="v1",
        remote_url=str(remote),
        batches=[batch.relative_to(ws)],
        processed_dir="data/inbox-processed",
    )


STEPS = [
    "ensure_remote",
    "dvc push",
    "store_model",
    "record_release",
    "set_current",
    "git add",
    "git commit",
    "git tag -a",
    "inbox-archive",
]


@pytest.mark.slow
@pytest.mark.parametrize("step", STEPS)
def test_a_release_killed_after_any_step_is_finished_by_recover(repo, tmp_path, monkeypatch, step):
    write_challenger(repo, "a", +1)
    batch = _batch(repo)
    onnx = (repo / "models/model.onnx").read_bytes()
    with monkeypatch.context() as m:
        if step == "inbox-archive":  # the last step: the batch is archived, the pending record not yet removed
            from components.retrain import inbox

            def archive_and_die(*args, real=inbox.archive):
                real(*args)
                raise Killed(step)

            m.setattr(inbox, "archive", archive_and_die)
        else:
            _kill_after(m, step)
        with pytest.raises(Killed):
            _publish(repo, tmp_path / "remote", batch)
    assert promote.pending(repo), "the release stays pending until its batches are archived"

    done = promote.recover(repo)
    assert any("finishing the interrupted promoted release of model " + A in d for d in done), done
    assert promote.pending(repo) is None and promote.recover(repo) == []
    assert registry.current(repo) == {"model_id": A, "git_tag": f"model-{A}"}
    assert [(r["event"], r["model_id"], r["flow_run_id"]) for r in registry.releases(repo)] == [
        ("promoted", A, "run-1")
    ]
    assert sh(repo, "git", "rev-list", "-n", "1", f"model-{A}") == sh(repo, "git", "rev-parse", "HEAD")
    assert sh(repo, "git", "log", "--format=%s").count("promote model") == 1
    assert sh(repo, "git", "status", "--porcelain", "--untracked-files=no") == ""
    assert (repo / f"registry/models/{A}/model.onnx").read_bytes() == onnx == (repo / "models/model.onnx").read_bytes()
    assert not batch.exists() and len(list((repo / "data/inbox-processed").iterdir())) == 1


@pytest.mark.slow
def test_an_uncommitted_release_whose_outputs_changed_is_dropped_and_its_batch_stays(repo, tmp_path, monkeypatch):
    promote_first(repo, tmp_path / "remote")
    write_challenger(repo, "c", +1)
    batch = _batch(repo)
    before = {n: (repo / "registry" / n).read_text() for n in ("current.json", "releases.jsonl")}
    with monkeypatch.context() as m:
        _kill_after(m, "set_current")
        with pytest.raises(Killed):
            _publish(repo, tmp_path / "remote", batch, flow_run_id="run-2")
    write_challenger(repo, "e", +1)  # the pipeline ran again since: the pending release is not this model

    done = promote.recover(repo)
    assert len(done) == 3 and f"dropped the interrupted promoted release of model {C}" in done[-1], done
    assert "models/lineage.json" in done[-1] and "stay in the inbox" in done[-1]
    assert {n: (repo / "registry" / n).read_text() for n in before} == before
    assert promote.pending(repo) is None and not (repo / f"registry/models/{C}").exists()
    assert batch.is_dir() and not (repo / "data/inbox-processed").exists()
    assert sh(repo, "git", "status", "--porcelain", "--untracked-files=no", "--", "registry") == ""
    # The batch is retrained and recorded as usual.
    rec = _publish(repo, tmp_path / "remote", batch, flow_run_id="run-3")
    assert rec["model_id"] == E and registry.current(repo)["model_id"] == E and not batch.exists()


@pytest.mark.slow
def test_publish_refuses_a_second_release_while_one_is_pending(repo, tmp_path, monkeypatch):
    write_challenger(repo, "a", +1)
    with monkeypatch.context() as m:
        _kill_after(m, "dvc push")
        with pytest.raises(Killed):
            _publish(repo, tmp_path / "remote", _batch(repo))
    with pytest.raises(common.StageError, match=r"medtune-release.json: another release \(promoted of model"):
        _publish(repo, tmp_path / "remote", repo / "data/inbox/b1", flow_run_id="run-2")
    # The same release again (the task's retry after an I/O error) finishes it.
    assert _publish(repo, tmp_path / "remote", repo / "data/inbox/b1")["flow_run_id"] == "run-1"
    assert promote.pending(repo) is None and registry.current(repo)["model_id"] == A


# ---------------------------------------------------------------------------------------------
# The public patient salt
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_publish_refuses_data_hashed_with_a_public_salt_before_pushing(repo, tmp_path):
    write_challenger(repo, "a", +1)
    head = sh(repo, "git", "rev-parse", "HEAD")
    common.write_json(
        repo / "data/manifest.json",
        {"patient_salt": {"status": "public", "source": "params.yaml default", "real_patient_ids": True}},
    )
    decision = challenger.compare(repo, PARAMS, "auroc", 0.01)
    with pytest.raises(
        common.StageError,
        match=r"public salt \(params.yaml default\); not recording \(nothing "
        r"committed or pushed\)\. Set a secret MEDTUNE_PATIENT_SALT",
    ):
        promote.publish(
            repo, decision, trigger="event", flow_run_id="r", data_version="v1", remote_url=str(tmp_path / "remote")
        )
    assert sh(repo, "git", "rev-parse", "HEAD") == head and not (tmp_path / "remote").exists()
    assert promote.pending(repo) is None and registry.current(repo) is None
    rec = promote.publish(
        repo,
        decision,
        trigger="event",
        flow_run_id="r",
        data_version="v1",
        remote_url=str(tmp_path / "remote"),
        allow_public_salt=True,
    )
    assert rec["event"] == "promoted"


def test_salt_status_is_secret_only_from_a_distinct_environment_variable(monkeypatch):
    monkeypatch.delenv("MEDTUNE_PATIENT_SALT", raising=False)
    assert common.salt_status("medtune-public-salt") == {"status": "public", "source": "params.yaml default"}
    assert common.salt_status("our-salt") == {"status": "public", "source": "params.yaml"}
    for value, why in (
        ("", "empty"),
        ("our-salt", "equal to params.yaml"),
        ("medtune-public-salt", "equal to the shipped default"),
    ):
        monkeypatch.setenv("MEDTUNE_PATIENT_SALT", value)
        assert common.salt_status("our-salt") == {"status": "public", "source": f"MEDTUNE_PATIENT_SALT, {why}"}
    monkeypatch.setenv("MEDTUNE_PATIENT_SALT", "2f9c0d-test-secret")
    assert common.salt_status("our-salt") == {"status": "secret", "source": "MEDTUNE_PATIENT_SALT"}


def test_retrain_refuses_real_patient_ids_with_a_public_salt_unless_allowed(tmp_path, monkeypatch, caplog):
    from components.data import demo_data

    monkeypatch.delenv("MEDTUNE_PATIENT_SALT", raising=False)
    dicom = tmp_path / "inbox/dicom"  # made-up DICOM PatientIDs: real ids as far as medtune can tell
    demo_data.generate(dicom, patients=1, slices=1, size=32, seed=0, classes=["normal", "lesion"])
    png = tmp_path / "inbox/png"  # no patient id at all: each file is its own patient (hash of the path)
    (png / "normal").mkdir(parents=True)
    import PIL.Image

    PIL.Image.new("L", (32, 32)).save(png / "normal/x.png")
    public, allowed = PARAMS, parse_params({"retrain": {"allow_public_salt": True}})

    assert salt_guard.refuse_public_salt(tmp_path, public, [png]) == {
        "status": "public",
        "source": "params.yaml default",
    }
    with caplog.at_level("WARNING"), pytest.raises(common.StageError) as err:
        salt_guard.refuse_public_salt(tmp_path, public, [png, dicom])
    assert (
        f"batch {dicom} (1 scan(s) with a patient id) would be hashed with a public salt (params.yaml default)"
        in str(err.value)
        and "Nothing was appended" in str(err.value)
        and "retrain.allow_public_salt" in str(err.value)
    )
    warned = [r.getMessage() for r in caplog.records if "PUBLIC salt" in r.getMessage()]
    assert len(warned) == 1 and str(dicom) in warned[0] and "token_hex" in warned[0]  # once, for the DICOM batch
    assert salt_guard.refuse_public_salt(tmp_path, allowed, [dicom])["status"] == "public"
    # The raw data already holds real ids (ingest's record): refused even for a batch without any.
    common.write_json(
        tmp_path / "data/manifest.json",
        {
            "patient_source": "DICOM PatientID",
            "patient_salt": {"status": "secret", "source": "MEDTUNE_PATIENT_SALT", "real_patient_ids": True},
        },
    )
    with pytest.raises(common.StageError, match=r"the raw data \(patients from DICOM PatientID"):
        salt_guard.refuse_public_salt(tmp_path, public, [png])
    monkeypatch.setenv("MEDTUNE_PATIENT_SALT", "2f9c0d-test-secret")
    assert salt_guard.refuse_public_salt(tmp_path, public, [dicom]) == {
        "status": "secret",
        "source": "MEDTUNE_PATIENT_SALT",
    }


# ---------------------------------------------------------------------------------------------
# A release must reproduce: no promotion of uncommitted code; no credentials in the committed config
# ---------------------------------------------------------------------------------------------


def _with_code(ws: Path, commit: str, dirty: bool | None) -> None:
    """The code record export writes into the lineage (common.git_facts at export time)."""
    lineage = json.loads((ws / "models/lineage.json").read_text())
    lineage["code"] = {"git_commit": commit, "git_dirty": dirty, "params": {}, "params_sha256": "x"}
    common.write_json(ws / "models/lineage.json", lineage)


@pytest.mark.slow
def test_a_model_a_release_tag_would_not_reproduce_is_not_promoted(repo):
    (repo / "src").mkdir()
    (repo / "src/stage.py").write_text("print('stage')\n")
    sh(repo, "git", "add", "src/stage.py")
    sh(repo, "git", "commit", "-qm", "code")
    head = sh(repo, "git", "rev-parse", "HEAD")
    write_challenger(repo, "a", +1)

    def blockers(commit: str, dirty: bool | None) -> list[str]:
        _with_code(repo, commit, dirty)
        decision = challenger.compare(repo, PARAMS, "auroc", 0.01)
        assert decision["promote"] is (not [r for r in decision["reasons"] if "would not reproduce" in r])
        return [r for r in decision["reasons"] if "would not reproduce" in r]

    assert blockers(head, False) == []
    (repo / "params.yaml").write_text("train: {epochs: 8}\n")  # parameters are committed by the release: fine
    assert blockers(head, False) == []
    assert "exported (lineage git_dirty: true)" in " ".join(blockers(head, True))
    assert "exported (lineage git_dirty: null)" in " ".join(blockers(head, None))
    assert "git commit ffffffffffff is not in this repository" in " ".join(blockers("f" * 40, False))
    (repo / "src/stage.py").write_text("print('changed')\n")
    assert "working tree's code differs from HEAD (commit it): src/stage.py" in " ".join(blockers(head, False))
    sh(repo, "git", "commit", "-qam", "new code")
    assert f"code changed between the model's commit {head[:12]} and HEAD: src/stage.py" in " ".join(
        blockers(head, False)
    )
    new_head = sh(repo, "git", "rev-parse", "HEAD")
    (repo / "data/raw/b.txt").write_text("a scan that dvc add has not recorded")
    assert "`dvc status` is not clean" in " ".join(blockers(new_head, False))


@pytest.mark.slow
def test_ensure_remote_keeps_the_default_dvc_resolves_and_an_unreadable_config_is_named(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    sh(ws, "git", "init", "-q")
    sh(ws, "dvc", "init", "-q")
    # A default remote set only in .dvc/config.local (git-ignored) is the default: nothing is added.
    sh(ws, "dvc", "remote", "add", "--local", "-d", "mine", str(tmp_path / "mine"))
    assert dvc_project.ensure_remote(ws, str(tmp_path / "other")) == "mine"
    assert "remote" not in (ws / ".dvc/config").read_text() and not (tmp_path / "other").exists()
    (ws / ".dvc/config.local").unlink()
    assert dvc_project.ensure_remote(ws, str(tmp_path / "other")) == "medtune"
    assert sh(ws, "dvc", "remote", "default") == "medtune" and (tmp_path / "other").is_dir()
    (ws / ".dvc/config").write_text("[core\n")
    for check in (dvc_project.refuse_secrets_in_config, lambda root: dvc_project.ensure_remote(root, "x")):
        with pytest.raises(common.StageError, match=r"\.dvc/config: not readable as DVC config \(.*line 1"):
            check(ws)


@pytest.mark.slow
def test_publish_refuses_credentials_in_the_dvc_config_it_commits(repo, tmp_path):
    write_challenger(repo, "a", +1)
    head = sh(repo, "git", "rev-parse", "HEAD")
    sh(repo, "dvc", "remote", "add", "-d", "store", "s3://bucket/medtune")
    sh(repo, "dvc", "remote", "modify", "store", "secret_access_key", "do-not-commit-me")
    decision = challenger.compare(repo, PARAMS, "auroc", 0.01)
    with pytest.raises(
        common.StageError, match=r"config holds credentials \(\['remote \"store\"'\] secret_access_key\)"
    ):
        promote.publish(repo, decision, trigger="event", flow_run_id="r", data_version="v1")
    assert sh(repo, "git", "rev-parse", "HEAD") == head and promote.pending(repo) is None
    # The same option in .dvc/config.local (git-ignored) is where it belongs; a password in the URL is refused too.
    sh(repo, "dvc", "remote", "modify", "--unset", "store", "secret_access_key")
    sh(repo, "dvc", "remote", "modify", "--local", "store", "secret_access_key", "do-not-commit-me")
    dvc_project.refuse_secrets_in_config(repo)
    sh(repo, "dvc", "remote", "add", "web", "https://user:hunter2@example.org/dvc")
    with pytest.raises(common.StageError, match=r"\['remote \"web\"'\] url"):
        dvc_project.refuse_secrets_in_config(repo)
    assert "do-not-commit-me" not in (repo / ".dvc/config").read_text()
