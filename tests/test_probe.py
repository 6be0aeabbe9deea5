"""The linear probe (components/model/probe.py): the head never sees test, a separable toy is learnt,
the paired bootstrap of the AUROC gain, the starting weights it picks, and the gain on the card and
in the trace."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from components.common import StageError
from components.model import probe
from components.params import parse_params
from tests.builders import CLASSES, make_prepared, make_project, run_export, tiny_params

RANDOM_START = {"name": "none", "source": "random init (resnet18 architecture)", "sha256": "none"}


def ckpt_of(classes=CLASSES, backbone="resnet18", pretrained=None, channels=1):
    """What the probe reads of a checkpoint (train's format): architecture, classes, input, start."""
    return {
        "backbone": backbone,
        "classes": list(classes),
        "in_channels": channels,
        "pretrained": RANDOM_START if pretrained is None else pretrained,
        "params": {"train": {"class_weighting": True}},
    }


def binary(p_pos):
    p_pos = np.asarray(p_pos, dtype=float)
    return np.stack([1 - p_pos, p_pos], axis=1)


# ---------------------------------------------------------------------------------------------
# Fitting: train and val only
# ---------------------------------------------------------------------------------------------


def test_the_head_is_fitted_without_the_test_split(tmp_path):
    prepared = make_prepared(tmp_path / "prepared", per_class={"train": 6, "val": 3, "test": 4})
    params = tiny_params()
    clean = probe.fit_probe(ckpt_of(), prepared, params)

    # Poison the test split: every label flipped, every image replaced by noise.
    index = pd.read_csv(prepared / "index.csv", dtype=str, keep_default_na=False)
    test = index["split"] == "test"
    index.loc[test, "label_index"] = (1 - index.loc[test, "label_index"].astype(int)).astype(str)
    index.loc[test, "label"] = [CLASSES[int(i)] for i in index.loc[test, "label_index"]]
    index.to_csv(prepared / "index.csv", index=False)
    shape = np.load(prepared / "test.npy").shape
    np.save(prepared / "test.npy", np.random.default_rng(9).integers(0, 255, shape, dtype=np.uint8))
    poisoned = probe.fit_probe(ckpt_of(), prepared, params)

    lr_clean, lr_poisoned = clean.head[-1], poisoned.head[-1]
    assert poisoned.C == clean.C
    assert np.array_equal(lr_poisoned.coef_, lr_clean.coef_) and np.array_equal(
        lr_poisoned.intercept_, lr_clean.intercept_
    )
    assert np.array_equal(poisoned.val_probs, clean.val_probs)
    # The test images were read (after the fit): the new ones score differently.
    assert not np.allclose(poisoned.test_probs, clean.test_probs)
    assert (clean.n_train, clean.n_val) == (12, 6)


def test_the_regularisation_is_chosen_on_val():
    # Separable train features; the same C grid judged by two val splits. Every C ranks val perfectly,
    # so log loss decides: a val split that agrees with train wants the most confident head (a weak
    # regularisation), one whose labels are reversed the least confident (the strongest).
    rng = np.random.default_rng(0)
    y_train, y_val = np.arange(40) % 2, np.arange(20) % 2
    x_train, x_val = rng.normal(size=(40, 5)), rng.normal(size=(20, 5))
    x_train[:, 0] += 8.0 * y_train
    x_val[:, 0] += 8.0 * y_val
    _, c_agrees, auroc_agrees = probe.fit_head(x_train, y_train, x_val, y_val, 2, 1, True)
    _, c_reversed, auroc_reversed = probe.fit_head(x_train, y_train, x_val, 1 - y_val, 2, 1, True)
    assert (auroc_agrees, auroc_reversed) == (1.0, 0.0)
    assert c_reversed == min(probe.C_GRID) < c_agrees
    with pytest.raises(StageError, match="two classes in the train split"):
        probe.fit_head(x_train, np.zeros(40, dtype=int), x_val, y_val, 2, 1, True)


def test_a_separable_toy_gets_a_high_probe_auroc(tmp_path):
    # make_prepared's lesions carry a bright square: frozen random features and a linear head find it.
    prepared = make_prepared(tmp_path / "prepared", per_class={"train": 8, "val": 4, "test": 6})
    y_test = np.array([0] * 6 + [1] * 6)
    record = probe.linear_probe(ckpt_of(), prepared, tiny_params(), y_test, binary(np.full(12, 0.5)))
    assert record["auroc"] >= 0.9 and record["val_auroc"] >= 0.9
    assert record["n_test"] == 12 and record["threshold"] == 0.5 and record["threshold_method"] == "fixed"
    # A model that says nothing (every probability 0.5) has AUROC 0.5: the gain is negative.
    assert record["fine_tuned_auroc"] == 0.5 and record["auroc_gain"] == pytest.approx(0.5 - record["auroc"])
    lo, hi = record["auroc_gain_ci"]
    assert lo <= record["auroc_gain"] <= hi and hi < 0
    assert record["start"]["init"] == record["start"]["model_start"] == "random"


def test_three_classes(tmp_path):
    classes = ("a", "b", "c")
    prepared = make_prepared(tmp_path / "prepared", classes=classes, per_class={"train": 4, "val": 3, "test": 3})
    params = parse_params({"data": {"classes": list(classes)}, "evaluate": {"bootstrap": 20}})
    y_test = np.repeat(np.arange(3), 3)
    model = np.eye(3)[y_test] * 0.8 + 0.2 / 3  # a model that ranks every class perfectly
    record = probe.linear_probe(ckpt_of(classes), prepared, params, y_test, model)
    assert record["threshold"] is None and record["threshold_method"] is None
    assert record["fine_tuned_auroc"] == 1.0 and record["auroc_gain"] == pytest.approx(1.0 - record["auroc"])
    assert np.array(record["confusion_matrix"]).shape == (3, 3)


# ---------------------------------------------------------------------------------------------
# The paired bootstrap
# ---------------------------------------------------------------------------------------------


def gain_of(y, model, other, n_boot, seed):
    g = probe.auroc_gain(y, binary(model), binary(other), 1, n_boot, seed)
    return g["auroc_gain"], g["auroc_gain_ci"], g["bootstrap_valid"]


def test_a_probe_equal_to_the_model_gains_exactly_nothing():
    rng = np.random.default_rng(3)
    y = np.array([0, 1] * 15)
    p = np.clip(0.5 * y + rng.uniform(0, 0.6, size=30), 0, 1)
    assert gain_of(y, p, p, 100, 0) == (0.0, [0.0, 0.0], 100)
    # Same ranking, other probabilities: AUROC is the same on every resample, so only a pairing of the
    # two models on the same resampled images gives a zero-width interval.
    assert gain_of(y, p, p**3, 100, 0) == (0.0, [0.0, 0.0], 100)


def test_the_gain_interval_brackets_the_gain():
    rng = np.random.default_rng(4)
    y = np.array([0, 1] * 20)
    model = np.clip(0.4 * y + rng.uniform(0, 0.6, size=40), 0, 1)  # good, not perfect
    weak = np.clip(0.1 * y + rng.uniform(0, 0.9, size=40), 0, 1)
    gain, (lo, hi), valid = gain_of(y, model, weak, 100, 1)
    assert 0 < lo < gain < hi and valid == 100
    # Reversed roles, reversed gain: the same resamples, each difference negated.
    back, (blo, bhi), _ = gain_of(y, weak, model, 100, 1)
    assert back == pytest.approx(-gain) and (blo, bhi) == pytest.approx((-hi, -lo))
    # Another seed, other resamples; none at all, no interval.
    assert gain_of(y, model, weak, 100, 2)[1] != [lo, hi]
    assert gain_of(y, model, weak, 0, 1) == (gain, [None, None], 0)


def test_the_resamples_are_the_main_intervals():
    # Four images, one positive: many resamples lack it and count for no interval. The probe's own
    # interval is the one metrics.bootstrap_auroc gives it: the same resamples, skipped alike.
    from components.model.metrics import bootstrap_auroc

    y = np.array([0, 0, 0, 1])
    model, other = binary([0.1, 0.4, 0.3, 0.8]), binary([0.2, 0.1, 0.3, 0.25])
    g = probe.auroc_gain(y, model, other, 1, 100, 5)
    assert 0 < g["bootstrap_valid"] < 100
    assert (g["probe_auroc_ci"], g["bootstrap_valid"]) == tuple(bootstrap_auroc(y, other, 1, 100, 5))
    assert bootstrap_auroc(y, model, 1, 100, 5)[1] == g["bootstrap_valid"]


# ---------------------------------------------------------------------------------------------
# The starting weights
# ---------------------------------------------------------------------------------------------


def lite0_start():
    from components.model.models import build_model, describe_start

    return describe_start(build_model("efficientnet_lite0", 2, 1, True)[1])


def test_an_imagenet_model_is_probed_from_the_same_weights_and_a_warm_start_from_imagenet():
    start = lite0_start()
    net, rec = probe.probe_backbone(ckpt_of(backbone="efficientnet_lite0", pretrained=start), 0)
    assert rec["init"] == rec["model_start"] == "imagenet" and rec["sha256"] == start["sha256"]
    assert net(__import__("torch").zeros(2, 1, 32, 32)).shape == (2, 1280)  # pooled features, no head

    warm = {"name": "champion 3f2a9c1e0b7d", "sha256": "c" * 64, "init": "warm-start", "model_id": "3f2a9c1e0b7d"}
    _, rec = probe.probe_backbone(ckpt_of(backbone="efficientnet_lite0", pretrained=warm), 0)
    assert rec["init"] == "imagenet" and rec["model_start"] == "warm-start" and rec["sha256"] == start["sha256"]

    other = {**start, "sha256": "0" * 64}
    with pytest.raises(StageError, match=f"sha256 {'0' * 64}.*have sha256 {start['sha256']}"):
        probe.probe_backbone(ckpt_of(backbone="efficientnet_lite0", pretrained=other), 0)


def test_missing_imagenet_weights_name_the_switch(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    start = {"name": "resnet18", "source": "torchvision:x", "sha256": "f37072fd" + "0" * 56, "init": "imagenet"}
    with pytest.raises(
        StageError,
        match=r"evaluate.linear_probe needs the ImageNet weights of resnet18: .*"
        r"set evaluate.linear_probe: false",
    ):
        probe.probe_backbone(ckpt_of(pretrained=start), 0)


def test_a_warm_start_from_scratch_is_probed_from_random_weights():
    # A from-scratch lineage (train.pretrained false) warm-started from its champion: no ImageNet weights
    # are needed (a resnet18's are not installed), the probe takes the random cold start.
    warm = {"name": "champion 3f2a9c1e0b7d", "sha256": "c" * 64, "init": "warm-start", "model_id": "3f2a9c1e0b7d"}
    for train in ({"backbone": "none", "pretrained": False}, {"backbone": "resnet18", "pretrained": False}):
        ckpt = {**ckpt_of(pretrained=warm), "params": {"train": train}}
        assert probe.probe_init(ckpt) == ("warm-start", "random")
        _, rec = probe.probe_backbone(ckpt, 0)
        assert rec["init"] == "random" and rec["model_start"] == "warm-start"
    assert probe.probe_init({**ckpt_of(pretrained=warm), "params": {"train": {"backbone": "resnet18"}}}) == (
        "warm-start",
        "imagenet",
    )


def test_a_random_start_is_seeded():
    import torch

    x = torch.rand(2, 1, 32, 32)
    a, rec = probe.probe_backbone(ckpt_of(), 7)
    b, _ = probe.probe_backbone(ckpt_of(), 7)
    c, _ = probe.probe_backbone(ckpt_of(), 8)
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
    assert rec["init"] == "random" and rec["seed"] == 7


# ---------------------------------------------------------------------------------------------
# The stage, the card and the trace
# ---------------------------------------------------------------------------------------------


def test_the_gain_reaches_metrics_card_lineage_and_trace(tmp_path):
    from components.audit import trace, trace_text

    params = tiny_params()
    p = make_project(tmp_path, params)
    run_export(p, params)
    record = json.loads((p["reports"] / "evaluation.json").read_text())
    lp = record["linear_probe"]
    metrics = json.loads((p["reports"] / "metrics.json").read_text())
    assert metrics["probe_auroc"] == lp["auroc"] and metrics["auroc_gain"] == lp["auroc_gain"]
    assert [metrics["auroc_gain_ci_low"], metrics["auroc_gain_ci_high"]] == lp["auroc_gain_ci"]
    assert lp["fine_tuned_auroc"] == record["auroc"]
    assert lp["auroc_gain"] == pytest.approx(record["auroc"] - lp["auroc"])
    lineage = json.loads((p["out"] / "lineage.json").read_text())
    assert lineage["evaluation"]["metrics"]["linear_probe"] == lp

    lo, hi = lp["auroc_gain_ci"]
    card = (p["out"] / "model_card.md").read_text()
    assert f"| fine-tuned (this model) | {record['auroc']:.3f} |" in card
    assert f"| linear probe | {lp['auroc']:.3f} |" in card
    assert f"| **{lp['auroc_gain']:+.3f}** | {lo:+.3f} to {hi:+.3f} (paired bootstrap" in card

    text = trace_text.render(trace.trace(p["out"], tmp_path))
    assert (
        f"gain from fine-tuning: auroc {record['auroc']:.3f} - {lp['auroc']:.3f} = {lp['auroc_gain']:+.3f} "
        f"(95% CI {lo:+.3f} to {hi:+.3f}, paired bootstrap" in text
    )
    assert f"linear probe: auroc {lp['auroc']:.3f}" in text


def test_switched_off_the_probe_is_said_not_measured(tmp_path):
    from components.audit import trace, trace_text

    params = parse_params(
        {**tiny_params().to_dict(), "evaluate": {**tiny_params().evaluate.to_dict(), "linear_probe": False}}
    )
    p = make_project(tmp_path, params)
    run_export(p, params)
    assert "linear_probe" not in json.loads((p["reports"] / "evaluation.json").read_text())
    assert not {"probe_auroc", "auroc_gain"} & set(json.loads((p["reports"] / "metrics.json").read_text()))
    assert "Not measured: the evaluation has no linear probe" in (p["out"] / "model_card.md").read_text()
    assert "gain from fine-tuning: not recorded: no linear probe" in trace_text.render(trace.trace(p["out"], tmp_path))


def test_the_card_says_when_the_probe_started_elsewhere_than_the_model():
    # A warm-started model is probed from ImageNet: the card names both starts.
    from components.release.model_card import model_card

    start = {"description": "ImageNet efficientnet_lite0 weights", "init": "imagenet", "model_start": "warm-start"}
    metrics = {
        "classes": list(CLASSES),
        "positive_class": "lesion",
        "n_test": 8,
        "auroc": 0.9,
        "auroc_ci": [0.8, 0.97],
        "confusion_matrix": [[3, 1], [0, 4]],
        "sensitivity": 1.0,
        "specificity": 0.75,
        "precision": 0.8,
        "accuracy": 0.875,
        "f1": 0.889,
        "threshold": 0.5,
        "linear_probe": {
            "start": start,
            "C": 0.01,
            "n_train": 12,
            "auroc": 0.85,
            "auroc_ci": [None, None],
            "auroc_gain": 0.05,
            "auroc_gain_ci": [-0.02, 0.11],
            "auroc_gain_bootstrap_valid": 990,
        },
    }
    ckpt = {"backbone": "efficientnet_lite0", "pretrained": {"description": "warm start from champion 3f2a9c1e0b7d"}}
    exp = {"opset": 17, "max_abs_diff_batch1": 0.0, "max_abs_diff_batchN": 0.0, "batch_n": 8}
    lines = model_card("abc123def456", ckpt, {}, metrics, {"passed": True}, {}, exp, False).splitlines()
    assert (
        "Linear probe: ImageNet efficientnet_lite0 weights, frozen, with only a logistic-regression head fitted on "
        "the features of the 12 training images (C = 0.01, chosen on the validation split); the model itself "
        "started from warm start from champion 3f2a9c1e0b7d, so the gain includes what that start brought. Both "
        "scored on the same test images:" in lines
    )
    assert "| fine-tuned (this model) | 0.900 | 0.800 - 0.970 (bootstrap) |" in lines
    assert "| linear probe | 0.850 | n/a |" in lines
    assert (
        "| **gain (fine-tuned - probe)** | **+0.050** | -0.020 to +0.110 (paired bootstrap, 990 resamples) |" in lines
    )
