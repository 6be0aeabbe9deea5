"""Grad-CAM explanations: the heatmap finds the evidence, evaluate writes a fixed sample of the test
split without patient identifiers, and `medtune predict --explain` an overlay per scan."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.common import StageError
from components.model.explain import MIN_SIDE, choose, groups, heatmaps, target_layer
from components.params import parse_params
from tests.builders import RAW_ID, RAW_NAME, RAW_PATIENT, make_checkpoint, make_prepared, write_dicom

SIZE = 64  # the demo's image size: the target layer is the stride-16 block (a 4 x 4 map)


def quadrant_scans(quadrants, rng, size=SIZE):
    """Dark noise with, per image, a bright square in the middle of quadrant (row, col), or none (None)."""
    x = rng.integers(0, 80, (len(quadrants), 1, size, size), dtype=np.uint8)
    h = size // 2
    for i, q in enumerate(quadrants):
        if q is not None:
            r, c = q
            x[i, :, r * h + h // 4 : r * h + 3 * h // 4, c * h + h // 4 : c * h + 3 * h // 4] = 230
    return x


def shares(heat, size=SIZE):
    """The fraction of each heatmap's mass per quadrant, (N, 2, 2)."""
    h = size // 2
    mass = heat.reshape(len(heat), 2, h, 2, h).sum(axis=(2, 4))
    return mass / mass.sum(axis=(1, 2), keepdims=True)


@pytest.fixture(scope="module")
def square_finder():
    """EfficientNet-Lite0 with its ImageNet weights (the offline package) and a head fitted on its frozen
    features: lesion = a bright square in any quadrant, normal = none."""
    import torch

    from components.model.models import build_model

    torch.manual_seed(0)
    model, _ = build_model("efficientnet_lite0", 2, 1, pretrained=True)
    model.eval()
    rng = np.random.default_rng(0)
    quadrants = [None] * 8 + [(0, 0), (0, 1), (1, 0), (1, 1)] * 2
    x = torch.from_numpy(quadrant_scans(quadrants, rng)).float() / 255
    y = torch.tensor([int(q is not None) for q in quadrants])
    with torch.no_grad():
        features = model.backbone((x.repeat(1, 3, 1, 1) - model.mean) / model.std)
    opt = torch.optim.Adam(model.head.parameters(), 1e-2)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model.head(features), y).backward()
        opt.step()
    return model


@pytest.mark.parametrize("tta", ["none", "hflip"])
def test_the_heatmap_concentrates_where_the_signal_is(square_finder, tta):
    """A square in each quadrant in turn: the model calls each a lesion, and the lesion heatmap puts
    most of its mass in that quadrant (uniform would be a quarter). With hflip the mirrored image's map
    is mirrored back, or the mass would split between the square and its mirror image."""
    import torch

    quadrants = [(0, 0), (0, 1), (1, 0), (1, 1)]
    x = quadrant_scans(quadrants, np.random.default_rng(1))
    with torch.no_grad():
        p = square_finder(torch.from_numpy(x).float() / 255).softmax(1)[:, 1].numpy()
    assert (p > 0.9).all(), p
    heat = heatmaps(square_finder, x, np.ones(4, dtype=int), tta=tta)
    assert heat.shape == (4, SIZE, SIZE) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() <= 1 + 1e-6
    share = shares(heat)
    for i, (r, c) in enumerate(quadrants):
        assert share[i, r, c] > 0.6, (tta, (r, c), share[i].round(3))


def test_the_target_layer_is_the_last_block_with_a_4x4_map():
    from components.model.models import architecture

    lite, resnet = architecture("efficientnet_lite0", 2, 1), architecture("resnet18", 2, 1)
    assert target_layer(lite, 224)[0] == "backbone.conv_head" and target_layer(lite, 128)[0] == "backbone.conv_head"
    assert target_layer(lite, 64) == ("backbone.blocks.4", lite.backbone.blocks[4])
    assert target_layer(lite, 32)[0] == "backbone.blocks.2"
    assert target_layer(resnet, 224) == ("backbone.layer4.-1", resnet.backbone.layer4[-1])
    assert target_layer(resnet, 64)[0] == "backbone.layer3.-1" and target_layer(resnet, 16)[0] == "backbone.layer2.-1"


def test_an_ensembles_heatmap_is_the_mean_of_its_members(tmp_path):
    from components.model.models import load_checkpoint

    ensemble, _ = load_checkpoint(make_checkpoint(tmp_path / "model.pt", size=32, members=2))
    x = quadrant_scans([(0, 1), None, (1, 0)], np.random.default_rng(2), size=32)
    targets = np.array([1, 0, 1])
    members = [heatmaps(m, x, targets) for m in ensemble.members]
    assert not np.allclose(members[0], members[1])  # two different maps, so the mean is a real test
    np.testing.assert_allclose(heatmaps(ensemble, x, targets), (members[0] + members[1]) / 2, atol=1e-6)


def test_groups_and_the_choice_within_a_group():
    y_true = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    y_pred = np.array([1, 1, 0, 1, 0, 0, 1, 0])
    masks = groups(y_true, y_pred, ["normal", "lesion"], positive_index=1)
    assert {g: np.flatnonzero(m).tolist() for g, m in masks.items()} == {
        "tp": [0, 1, 6],
        "fp": [3],
        "fn": [2],
        "tn": [4, 5, 7],
    }
    # The most confident first; equal confidence (to 6 decimals) in path order; never more than asked.
    confidence = np.array([0.7, 0.9, 0.8, 0.6, 0.95, 0.95 + 1e-9, 0.9, 0.5])
    paths = ["b", "z", "c", "d", "y", "x", "a", "e"]
    assert choose(masks, confidence, paths, 2) == {"tp": [6, 1], "fp": [3], "fn": [2], "tn": [5, 4]}
    assert choose(masks, confidence, paths, 0) == {"tp": [], "fp": [], "fn": [], "tn": []}

    three = groups(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 1]), ["a b", "c", "d/e"], positive_index=2)
    assert {g: np.flatnonzero(m).tolist() for g, m in three.items()} == {
        "a_b-correct": [0],
        "a_b-wrong": [],
        "c-correct": [],
        "c-wrong": [1],
        "d_e-correct": [2],
        "d_e-wrong": [3],
    }


def explain_params(per_group):
    return parse_params(
        {
            "evaluate": {
                "positive_class": "lesion",
                "bootstrap": 20,
                "linear_probe": False,
                "explain_per_group": per_group,
                "gate": {
                    "min_auroc": 0.0,
                    "min_sensitivity": 0.0,
                    "min_specificity": 0.0,
                    "min_balanced_accuracy": 0.0,
                },
            }
        }
    )


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_evaluate_writes_a_fixed_sample_per_group_without_patient_ids(tmp_path):
    from components.model.evaluate import evaluate

    prepared = make_prepared(tmp_path / "prepared", per_class={"train": 2, "val": 2, "test": 6}, size=32)
    model = make_checkpoint(tmp_path / "model.pt", size=32)
    evaluate(model, prepared, tmp_path / "a", explain_params(2))
    evaluate(model, prepared, tmp_path / "b", explain_params(2))
    folder = tmp_path / "a" / "explanations"
    assert folder_bytes(folder) == folder_bytes(tmp_path / "b" / "explanations")  # same inputs, same bytes

    index = json.loads((folder / "index.json").read_text())
    preds = pd.read_csv(tmp_path / "a" / "test_predictions.csv", keep_default_na=False)
    called, actual = preds["predicted"] == "lesion", preds["label"] == "lesion"
    sizes = {"tp": actual & called, "fp": ~actual & called, "fn": actual & ~called, "tn": ~actual & ~called}
    assert index["groups"] == {g: {"images": int(m.sum()), "explained": min(2, int(m.sum()))} for g, m in sizes.items()}
    assert index["target_layer"] == "backbone.layer2.-1" and index["method"] == "grad-cam"
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(e["file"] for e in index["images"])
    for entry in index["images"]:
        assert re.fullmatch(r"(tp|fp|fn|tn)-[0-9a-f]{12}\.png", entry["file"])
        row = preds.loc[preds["path"] == entry["path"]].iloc[0]
        assert (entry["label"], entry["predicted"]) == (row["label"], row["predicted"])
        assert entry["probability"] == pytest.approx(row[f"prob_{row['predicted']}"], abs=1e-6)
        # the most confident of its group were taken
        group = preds.loc[sizes[entry["group"]].to_numpy()]
        top = np.sort(group[[f"prob_{p}" for p in ("normal", "lesion")]].max(axis=1).round(6).to_numpy())[::-1]
        assert round(entry["probability"], 6) >= top[min(2, len(top)) - 1]
        with Image.open(folder / entry["file"]) as im:  # the scan beside its overlay, upscaled
            assert im.mode == "RGB" and im.size == (2 * 32 * 6, 32 * 6) and im.size[1] >= MIN_SIDE
    text = "".join(p.name for p in folder.iterdir()) + (folder / "index.json").read_text()
    patients = pd.read_csv(prepared / "index.csv")["patient"]
    assert RAW_PATIENT not in text and not any(p in text for p in patients)

    # 0 per group: the folder is replaced whole, by an index without images.
    evaluate(model, prepared, tmp_path / "a", explain_params(0))
    assert [p.name for p in folder.iterdir()] == ["index.json"]
    assert json.loads((folder / "index.json").read_text())["images"] == []
    assert not list(tmp_path.glob("a/.explanations*"))  # no temporary folder left


# ---------------------------------------------------------------------------------------------
# medtune predict --explain
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def scans(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "scans"
    (folder / "b").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8)).save(folder / "x.png")
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(folder / "b" / "x.png")  # same stem
    write_dicom(folder / "b" / "ct.dcm", rng.integers(900, 1300, (24, 24)))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return folder


def test_predict_explain_writes_an_overlay_per_scan_and_a_column(onnx_model, scans, tmp_path, monkeypatch):
    from components.release.predict import main, predict

    monkeypatch.chdir(tmp_path)
    table = predict(onnx_model, [scans], tmp_path / "p.csv", batch_size=2, explain_dir=tmp_path / "overlays")
    csv = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert list(csv.columns) == ["path", "prob_normal", "prob_lesion", "predicted", "error", "explanation"]
    assert csv["explanation"].tolist() == table["explanation"].tolist()
    written = sorted(p.name for p in (tmp_path / "overlays").iterdir())
    assert len(written) == 3 and "ct.png" in written  # one per readable scan
    assert all(re.fullmatch(r"x-[0-9a-f]{8}\.png", n) for n in written if n != "ct.png")  # same stem, two files
    for row in csv.to_dict("records"):
        if row["error"]:
            assert row["explanation"] == "" and row["path"].endswith("broken.png")
        else:
            with Image.open(row["explanation"]) as im:
                assert im.size == (2 * 32 * 6, 32 * 6)
    text = "".join(written) + (tmp_path / "p.csv").read_text()
    assert RAW_ID not in text and "Doe" not in text and RAW_NAME not in text

    # The command line: the same CSV and the same overlay bytes; without --explain no column.
    before = folder_bytes(tmp_path / "overlays")
    assert main([str(onnx_model), str(scans), "-o", "cli.csv", "--explain", "overlays", "--batch-size", "3"]) == 0
    assert folder_bytes(tmp_path / "overlays") == before
    cli = pd.read_csv("cli.csv", keep_default_na=False)
    assert [p.rsplit("/", 1)[-1] for p in cli["explanation"] if p] == [
        p.rsplit("/", 1)[-1] for p in csv["explanation"] if p
    ]
    assert main([str(onnx_model), str(scans), "-o", "plain.csv"]) == 0
    assert "explanation" not in pd.read_csv("plain.csv").columns


def test_predict_explain_needs_the_models_own_checkpoint(onnx_model, scans, tmp_path, monkeypatch, capsys):
    from components.release.onnx_runtime import read_metadata
    from components.release.predict import main, predict

    monkeypatch.chdir(tmp_path)
    sha = read_metadata(onnx_model)["checkpoint_sha256"]
    alone = tmp_path / "alone" / "model.onnx"
    alone.parent.mkdir()
    shutil.copy(onnx_model, alone)
    with pytest.raises(StageError) as err:
        predict(alone, [scans], tmp_path / "p.csv", explain_dir=tmp_path / "overlays")
    message = str(err.value)
    assert f"model.pt with sha256 {sha}" in message
    for looked in (
        f"{alone.parent}/model.pt (not found)",
        "models/model.pt (not found)",
        f"registry/models/{sha[:12]}/model.pt",
    ):
        assert looked in message, message
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "overlays").exists()  # refused before any work

    make_checkpoint(alone.parent / "model.pt", seed=5)  # another model's weights beside it
    assert main([str(alone), str(scans), "-o", "p.csv", "--explain", "overlays"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"alone/model\.pt \(sha256 [0-9a-f]{12}\.\.\., another model's\)", err), err
    assert not (tmp_path / "p.csv").exists()

    # Found by its content under registry/models/<id>/ in the working directory.
    (tmp_path / "registry" / "models" / sha[:12]).mkdir(parents=True)
    shutil.copy(onnx_model.parent / "model.pt", tmp_path / "registry" / "models" / sha[:12] / "model.pt")
    assert main([str(alone), str(scans), "-o", "p.csv", "--explain", "overlays"]) == 0
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 3


def test_predict_explain_without_torch_says_what_is_missing(onnx_model, scans, tmp_path, monkeypatch):
    """The slim predict image has ONNX Runtime and no torch: --explain stops with a StageError naming
    the missing package, before any scan is read, instead of an ImportError's traceback."""
    import sys

    from components.release.predict import predict

    for name in ("components.model.explain", "components.model.models", "components.model.pretrained"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "torch", None)  # what `import torch` meets where it is not installed
    with pytest.raises(StageError, match=r"--explain needs torch and grad-cam, and this environment lacks 'torch'"):
        predict(onnx_model, [scans], tmp_path / "p.csv", explain_dir=tmp_path / "overlays")
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "overlays").exists()
