"""Warm starts (train.init_from): real training on tiny synthetic data, a real registry, real DVC.

The champion is a 1-epoch resnet18-architecture model (backbone none) on 32 px images; its weights
are put where the registry keeps them (registry/models/<id>/model.pt) or fetched by DVC at its release.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from components.common import StageError, sha256_file, write_json
from components.model import models
from components.model.train import train
from components.params import BACKBONE_NAMES, parse_params
from components.release import registry
from components.retrain import challenger, promote
from components.retrain import workspace as project
from tests.builders import write_prepared
from tests.workspace import make_workspace, run, tool_env

TRAIN = {"backbone": "none", "epochs": 1, "batch_size": 8}


def fit(tmp: Path, prepared: Path, name: str, registry_dir: Path | None = None, **over: object) -> tuple[dict, Path]:
    params = parse_params({"train": {**TRAIN, **over}})
    out = tmp / name
    summary = train(
        prepared, out / "model.pt", out / "train.json", out / "dvclive", params, registry_dir or tmp / "registry"
    )
    return summary, out / "model.pt"


def register(registry_dir: Path, model_pt: Path) -> str:
    """Put a checkpoint where the registry keeps a promoted model's weights; returns its sha256."""
    sha = sha256_file(model_pt)
    dest = registry_dir / "models" / sha[:12] / "model.pt"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_pt, dest)
    return sha


@pytest.fixture(scope="module")
def champion(module_tmp) -> dict:
    tmp = module_tmp
    prepared = write_prepared(tmp / "prepared", n_train=16, n_val=8)
    summary, path = fit(tmp, prepared, "champion", lr=0.003)
    return {
        "tmp": tmp,
        "prepared": prepared,
        "path": path,
        "summary": summary,
        "sha": register(tmp / "registry", path),
        "ckpt": torch.load(path, weights_only=True),
    }


@pytest.mark.slow
def test_a_warm_start_begins_at_the_champions_weights(champion, tmp_path):
    """A vanishing lr with a frozen backbone (its BatchNorm statistics kept): the warm-started model
    is still the champion after an epoch, and so is its validation loss; a cold start is not."""
    c = champion
    still = {"freeze": "head", "lr": 1e-12, "scheduler": "none"}
    summary, path = fit(tmp_path, c["prepared"], "warm", c["tmp"] / "registry", init_from=c["sha"], **still)
    warm = torch.load(path, weights_only=True)
    for key, tensor in c["ckpt"]["state_dict"].items():
        torch.testing.assert_close(warm["state_dict"][key], tensor, rtol=0, atol=1e-8, msg=key)
    first = warm["history"][0]["val_loss"]
    assert first == pytest.approx(c["ckpt"]["history"][0]["val_loss"], abs=1e-6)
    assert warm["pretrained"] == {
        "name": f"champion {c['sha'][:12]}",
        "source": f"warm start: {c['tmp']}/registry/models/{c['sha'][:12]}/model.pt",
        "sha256": c["sha"],
        "init": "warm-start",
        "model_id": c["sha"][:12],
        "description": f"warm start from champion {c['sha'][:12]} (sha256 {c['sha']})",
    }
    assert summary["pretrained"] == warm["pretrained"]

    _, cold_path = fit(tmp_path, c["prepared"], "cold", **still)
    cold = torch.load(cold_path, weights_only=True)
    assert not torch.allclose(cold["state_dict"]["head.weight"], c["ckpt"]["state_dict"]["head.weight"])
    assert cold["history"][0]["val_loss"] != pytest.approx(first, abs=1e-3)
    assert cold["pretrained"]["init"] == "random" and "no pretrained weights" in cold["pretrained"]["description"]


@pytest.mark.slow
def test_weights_that_are_not_the_named_ones_are_refused_precisely(champion, tmp_path):
    c = champion
    reg = tmp_path / "registry"
    sha = register(reg, c["path"])
    weights = reg / "models" / sha[:12] / "model.pt"
    weights.write_bytes(weights.read_bytes() + b"\0")  # replaced or damaged after the parameter was set
    with pytest.raises(StageError, match=rf"model\.pt: sha256 [0-9a-f]{{64}}, but train\.init_from is {sha}"):
        fit(tmp_path, c["prepared"], "a", reg, init_from=sha)

    # A file whose hash is right but which is no plain file of tensors is never unpickled.
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": Path("/any/object/but/tensors")}, evil)  # unpickling it would build a Python object
    with pytest.raises(StageError, match="refused to unpickle"):
        fit(tmp_path, c["prepared"], "b", reg, init_from=register(reg, evil))

    # Weights of another model, never promoted here: nothing to fetch them from.
    with pytest.raises(StageError, match=r"was never promoted in this repository"):
        fit(tmp_path, c["prepared"], "c", tmp_path / "empty-registry", init_from="ab" * 32)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_a_champion_of_other_classes_shape_or_backbone_is_refused_naming_them(champion, tmp_path):
    c = champion
    reg = tmp_path / "registry"
    other = dict(c["ckpt"], classes=["benign", "malignant"])
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(StageError, match=r"classes \['benign', 'malignant'\] \(this run: \['normal', 'lesion'\]\)"):
        fit(tmp_path, c["prepared"], "a", reg, init_from=register(reg, tmp_path / "other.pt"))

    sha = register(reg, c["path"])
    small = write_prepared(tmp_path / "prepared16", n_train=8, n_val=4, size=16)
    with pytest.raises(StageError, match=r"image_size 32 \(this run: 16\).*train\.init_from: null for a cold start"):
        fit(tmp_path, small, "b", reg, init_from=sha)
    with pytest.raises(StageError, match=r"backbone 'resnet18' \(this run: 'efficientnet_lite0'\)"):
        fit(tmp_path, c["prepared"], "c", reg, init_from=sha, backbone="efficientnet_lite0")
    with pytest.raises(StageError, match=r"ensemble members 1 \(this run: 2\)"):
        fit(tmp_path, c["prepared"], "d", reg, init_from=sha, ensemble=2)


def test_init_from_is_checked_as_a_parameter():
    with pytest.raises(ValueError, match=r"train.init_from = 'model-3f2a' is invalid; expected null or the sha256"):
        parse_params({"train": {"init_from": "model-3f2a"}})
    with pytest.raises(ValueError, match=r"train.backbone = 'models/old.pt' is invalid.*second starting point"):
        parse_params({"train": {"init_from": "ab" * 32, "backbone": "models/old.pt"}})
    assert BACKBONE_NAMES == models.BACKBONES


@pytest.mark.slow
def test_the_retrain_plan_warm_starts_only_a_matching_champion_and_says_why_not(champion, tmp_path):
    c = champion
    root = tmp_path / "ws"
    assert registry.warm_start_plan(root, parse_params({}))["reason"] == "cold start: no champion yet"
    register(root / "registry", c["path"])
    mid = c["sha"][:12]
    write_json(root / "registry/current.json", {"model_id": mid, "git_tag": f"model-{mid}"})
    base = {"train": TRAIN, "preprocess": {"image_size": 32}}
    plan = registry.warm_start_plan(root, parse_params(base))
    assert plan == {
        "init_from": c["sha"],
        "model_id": mid,
        "reason": f"warm start from champion {mid} (sha256 {c['sha']})",
    }

    def reason(**over: dict) -> str:
        plan = registry.warm_start_plan(root, parse_params({**base, **over}))
        assert plan["init_from"] is None
        return plan["reason"]

    assert reason(retrain={"warm_start": False}) == "cold start: retrain.warm_start is false"
    assert "image_size 32 (this run: 64)" in reason(preprocess={"image_size": 64})
    assert "input channels 1 (this run: 3)" in reason(preprocess={"image_size": 32, "channels": 3})
    assert "classes ['normal', 'lesion'] (this run: ['a', 'b'])" in reason(data={"classes": ["a", "b"]})
    assert "backbone 'resnet18' (this run: 'efficientnet_lite0')" in reason(
        train={**TRAIN, "backbone": "efficientnet_lite0"}
    )

    # The flow's step: params.yaml gets the value (comments kept), and is not rewritten when it has it.
    params = root / "params.yaml"
    params.write_text(
        "# the project's parameters\npreprocess:\n  image_size: 32\ntrain:\n  backbone: none  # test\n"
        "  init_from: null  # set by the retrain flow\n"
    )
    assert project.apply_warm_start(root)["init_from"] == c["sha"]
    text = params.read_text()
    assert f"init_from: {c['sha']}" in text and "# the project's parameters" in text and "# test" in text
    before = params.stat().st_mtime_ns
    project.apply_warm_start(root)
    assert params.stat().st_mtime_ns == before
    shutil.rmtree(root / "registry/models")  # the champion's weights lost, and no git to fetch them from
    plan = project.apply_warm_start(root)
    assert plan["init_from"] is None and plan["reason"].startswith(f"cold start: champion {mid}'s weights:")
    assert "init_from: null" in params.read_text()


@pytest.mark.slow
def test_dvc_repro_warm_starts_from_the_champion_fetched_at_its_release(tmp_path, monkeypatch):
    """End to end on a real git + DVC project: the first model is promoted (its release pushes model.pt);
    the retrain step sets train.init_from, `dvc params diff` shows it, and `dvc repro` retrains from the
    champion's weights, which train fetches from the DVC remote itself when the registry copy is gone
    (as in a fresh clone); the lineage and `medtune trace` name the warm start."""
    for key, value in tool_env().items():  # the registry's own git and dvc commands: an identity, this venv
        monkeypatch.setenv(key, value)
    ws = make_workspace(tmp_path / "ws", patients=8)
    (ws / ".gitignore").write_text("/models/\n/reports/\n")
    run(["git", "add", "-A"], ws)
    run(["git", "commit", "-qm", "data"], ws)
    run(["dvc", "repro", "-q"], ws)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    p = parse_params(params)
    decision = challenger.compare(ws, p, "auroc", 0.01)
    assert decision["promote"], decision["reasons"]
    rec = promote.publish(
        ws,
        decision,
        trigger="manual",
        flow_run_id="t",
        data_version="v1",
        remote_url=str(tmp_path / "remote"),
        allow_public_salt=True,
    )  # made-up ids
    mid = rec["model_id"]
    kept = ws / f"registry/models/{mid}/model.pt"
    assert kept.is_file() and sha256_file(kept) == sha256_file(ws / "models/model.pt")
    assert "model.pt" not in run(["git", "show", "--name-only", "--format=", rec["git_tag"]], ws).stdout

    kept.unlink()  # a champion promoted before the registry kept its weights: fetched at its tag
    plan = project.apply_warm_start(ws)
    assert plan["init_from"] == sha256_file(ws / "models/model.pt") and plan["model_id"] == mid
    diff = json.loads(run(["dvc", "params", "diff", "--json"], ws).stdout)
    assert diff["params.yaml"]["train.init_from"] == {"old": None, "new": plan["init_from"]}

    kept.unlink()  # and train fetches them itself when the registry copy is missing
    out = run(["dvc", "repro"], ws)
    assert "Running stage 'train'" in out.stdout and f"warm start from champion {mid}" in out.stderr + out.stdout
    lineage = json.loads((ws / "models/lineage.json").read_text())
    assert lineage["pretrained"]["description"] == f"warm start from champion {mid} (sha256 {plan['init_from']})"
    assert lineage["code"]["params"]["train"]["init_from"] == plan["init_from"]
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["init_from"] == plan["init_from"]
    trace = run(["medtune", "trace", "models"], ws).stdout
    assert f"starting_weights: warm start from champion {mid} (sha256 {plan['init_from']})" in trace
    card = (ws / "models/model_card.md").read_text()
    assert f"started from: warm start from champion {mid}" in card
    assert "up to date" in run(["dvc", "status"], ws).stdout
