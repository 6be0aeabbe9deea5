"""The gain from fine-tuning: the trained model against a linear probe of its starting backbone.

    from components.model.probe import linear_probe
    record = linear_probe(ckpt, "data/prepared", params, y_test, model_probs)   # evaluation.json's linear_probe

The probe is the backbone the model started from, frozen, with only a new linear head: pooled
features of every prepared image (the model's own grey->RGB step and ImageNet normalisation, in
batches, no gradients, on the GPU when there is one), then a scikit-learn logistic regression fitted
on the train split, its inverse regularisation C chosen on the validation split (AUROC, then log
loss). The test split is scored once, after the head is fixed, and never shapes it. Test-time
augmentation is the model's: with `evaluate.tta: hflip` the validation and test features are the
mean of the image's and its mirror image's, which, the head being affine, is the mean of the two
logits, as `models.Deployed` averages them.

Which starting weights: those the checkpoint's `pretrained` record names when it is an ImageNet start
(the same file, checked by sha256); the architecture's random init, seeded with `evaluate.seed`, when
the model was trained from scratch. A champion (a warm start) or a checkpoint is not a frozen
backbone to probe: the probe then takes the cold start of the model's train params, ImageNet weights
of the architecture (random ones with train.pretrained false or backbone "none"). The record says
which (`start`, and the model's own start in `start.model_start`).

The record holds the probe's test metrics (components/model/metrics, the model's set, its threshold
chosen on the validation split as the model's is) and the AUROC gain, fine-tuned minus probe, with a
paired bootstrap interval: each resample scores both models on the same test images, drawn as the
main AUROC interval draws them (same seed, same count), so the gain's spread is not inflated by
resampling the two models apart. A regression model's probe (a ridge head, the MAE gain) is
components/model/probe_regression.py's, on this module's backbone and features.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from components.common import StageError
from components.model import calibrate
from components.model.metrics import CI_LEVEL, CI_PERCENTILES, auroc, compute_metrics
from components.model.models import Classifier, build_model, describe_start, n_outputs, pick_device
from components.params import Params

log = logging.getLogger("medtune.probe")

BATCH_SIZE = 64  # inference only; does not change the features
C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 7))  # the head's inverse L2 strength, chosen on val
MAX_ITER = 5000


@dataclass
class Probe:
    """A fitted probe: its head (scaler + logistic regression), the C chosen, and its probabilities."""

    head: Pipeline
    C: float
    val_auroc: float
    val_probs: np.ndarray
    y_val: np.ndarray
    test_probs: np.ndarray
    start: dict[str, Any]
    n_features: int
    n_train: int
    n_val: int


# ---------------------------------------------------------------------------------------------
# The frozen backbone and its features
# ---------------------------------------------------------------------------------------------


def probe_init(ckpt: dict[str, Any]) -> tuple[str, str]:
    """(the model's own start, the probe's: "imagenet" or "random"). An ImageNet or random start is
    probed as it was; a warm start or a checkpoint start is not a frozen backbone to probe, so the
    probe takes the start a cold run of the model's train params would have taken (ImageNet, unless
    train.pretrained was false or train.backbone "none")."""
    own = ckpt.get("pretrained") or {}
    # A checkpoint without the record predates it; train.pretrained's default was then the start.
    model_start = (own.get("init") or describe_start(own)["init"]) if own else "imagenet"
    if model_start in ("imagenet", "random"):
        return model_start, model_start
    train = (ckpt.get("params") or {}).get("train") or {}
    cold = train.get("pretrained", True) and train.get("backbone") != "none"
    return model_start, "imagenet" if cold else "random"


def probe_backbone(ckpt: dict[str, Any], seed: int) -> tuple[Classifier, dict[str, Any]]:
    """The checkpoint's architecture with the starting weights the probe uses, headless (its output
    is the pooled features) and in eval mode; returns (network, `start` record)."""
    arch, outputs, channels = ckpt["backbone"], n_outputs(ckpt), int(ckpt["in_channels"])
    own = ckpt.get("pretrained") or {}
    model_start, init = probe_init(ckpt)
    if init == "random":
        # A from-scratch model started from random weights: those are what fine-tuning gained over.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net, info = build_model(arch, outputs, channels, pretrained=False)
        start = {
            **describe_start(info),
            "description": f"random init ({arch}, seed {seed}), no pretrained weights, as a cold start of the model",
            "seed": seed,
        }
    else:
        try:
            net, info = build_model(arch, outputs, channels, pretrained=True)
        except StageError as exc:
            raise StageError(
                f"evaluate.linear_probe needs the ImageNet weights of {arch}: {exc} "
                "(or set evaluate.linear_probe: false to skip the probe)."
            ) from None
        start = describe_start(info)
        if model_start == "imagenet" and own.get("sha256") not in (None, info["sha256"]):
            raise StageError(
                f"the model started from {arch} weights with sha256 {own.get('sha256')}, but the ones installed "
                f"now ({info['source']}) have sha256 {info['sha256']}: the probe would not start where the "
                "model did. Reinstall the weights the model was trained with, or set evaluate.linear_probe: false."
            )
    net.head = nn.Identity()  # Classifier's forward then ends at the (dropout-free in eval) pooled features
    return net.eval(), {**start, "model_start": model_start}


def features(net: nn.Module, images: np.ndarray, device: Any, tta: str = "none") -> np.ndarray:
    """Pooled float64 features (N, F) of uint8 (N, C, H, W) images, scaled to [0, 1] as the model
    takes them; with tta "hflip", the mean of the image's and its mirror image's."""
    net.to(device)
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), BATCH_SIZE):
            batch = torch.from_numpy(np.array(images[start : start + BATCH_SIZE]))  # copy: memmaps are read-only
            x = batch.to(device=device, dtype=torch.float32) / 255.0
            f = net(x)
            if tta == "hflip":
                f = (f + net(torch.flip(x, dims=[3]))) / 2
            out.append(f.float().cpu().numpy())
    return np.concatenate(out).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# The head: fitted on train, C chosen on val, test never seen
# ---------------------------------------------------------------------------------------------


def head_probs(head: Pipeline, x: np.ndarray, k: int) -> np.ndarray:
    """(N, k) probabilities in class-index order (a class the head never saw gets 0)."""
    probs = np.zeros((len(x), k))
    probs[:, head.classes_] = head.predict_proba(x)
    return probs


def fit_head(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, k: int, pos: int, balanced: bool
) -> tuple[Pipeline, float, float]:
    """The logistic-regression head on standardised train features with the C of C_GRID that scores best
    on val (AUROC, then log loss; ties to the smaller C, the stronger regularisation); (head, C, val AUROC)."""
    if len(np.unique(y_train)) < 2:
        raise StageError(f"the linear probe needs at least two classes in the train split; it has {np.unique(y_train)}")
    best: tuple[tuple[float, float], Pipeline, float, float] | None = None
    for c in C_GRID:
        head = make_pipeline(
            StandardScaler(),
            LogisticRegression(C=c, max_iter=MAX_ITER, class_weight="balanced" if balanced else None),
        )
        with warnings.catch_warnings():
            # A weakly regularised fit of separable features may stop short of the optimum; it is one
            # candidate of the grid, judged on val like the others.
            warnings.simplefilter("ignore", ConvergenceWarning)
            head.fit(x_train, y_train)
        probs = head_probs(head, x_val, k)
        val_auroc = auroc(y_val, probs, pos)
        key = (-math.inf if math.isnan(val_auroc) else val_auroc, -log_loss(y_val, probs, labels=list(range(k))))
        if best is None or key > best[0]:
            best = (key, head, c, val_auroc)
    _, head, c, val_auroc = best
    return head, c, val_auroc


def fit_probe(ckpt: dict[str, Any], prepared_dir: str | Path, params: Params, device: Any = None) -> Probe:
    """Features of the three splits, the head fitted on train with C chosen on val, then the test
    probabilities (the test split is read only once the head is fixed)."""
    from components.data.preprocess import load_split

    prepared_dir, ev = Path(prepared_dir), params.evaluate
    device = device or pick_device()
    k, pos = len(ckpt["classes"]), params.positive_index
    net, start = probe_backbone(ckpt, ev.seed)
    split = {}
    for name, tta in (("train", "none"), ("val", ev.tta)):
        images, index = load_split(prepared_dir, name)
        split[name] = (features(net, images, device, tta), index["label_index"].to_numpy().astype(np.int64))
    balanced = bool(((ckpt.get("params") or {}).get("train") or {}).get("class_weighting", True))
    head, c, val_auroc = fit_head(*split["train"], *split["val"], k, pos, balanced)
    test_images, _ = load_split(prepared_dir, "test")
    return Probe(
        head=head,
        C=c,
        val_auroc=val_auroc,
        val_probs=head_probs(head, split["val"][0], k),
        y_val=split["val"][1],
        test_probs=head_probs(head, features(net, test_images, device, ev.tta), k),
        start=start,
        n_features=int(split["train"][0].shape[1]),
        n_train=len(split["train"][1]),
        n_val=len(split["val"][1]),
    )


# ---------------------------------------------------------------------------------------------
# The gain and the record
# ---------------------------------------------------------------------------------------------


def paired_resamples(
    y_true: np.ndarray, model_probs: np.ndarray, probe_probs: np.ndarray, positive_index: int, n_boot: int, seed: int
) -> np.ndarray:
    """(valid, 2): AUROC of the model and of the probe on each test set resampled with replacement, both
    scored on the same resample, the indices drawn as metrics.bootstrap_auroc draws them (same seed, same
    resamples); a resample missing a class (AUROC undefined for both) is skipped."""
    y_true = np.asarray(y_true).astype(np.int64)
    rng = np.random.default_rng(seed)
    n, pairs = len(y_true), []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        a, b = (
            auroc(y_true[idx], model_probs[idx], positive_index),
            auroc(y_true[idx], probe_probs[idx], positive_index),
        )
        if not (math.isnan(a) or math.isnan(b)):
            pairs.append((a, b))
    return np.asarray(pairs, dtype=np.float64).reshape(-1, 2)


def percentile_interval(values: np.ndarray) -> list[float | None]:
    """The 95% percentile interval of bootstrap values ([None, None] without any), as metrics' AUROC CI."""
    if len(values) == 0:
        return [None, None]
    lo, hi = np.percentile(values, CI_PERCENTILES)
    return [float(lo), float(hi)]


def auroc_gain(
    y_true: np.ndarray, model_probs: np.ndarray, probe_probs: np.ndarray, positive_index: int, n_boot: int, seed: int
) -> dict[str, Any]:
    """The model's and the probe's test AUROC, the gain (model minus probe) and, over the paired resamples
    (`paired_resamples`), the probe's 95% interval and the gain's: {fine_tuned_auroc, probe_auroc,
    probe_auroc_ci, auroc_gain, auroc_gain_ci, bootstrap_valid}."""
    y_true = np.asarray(y_true).astype(np.int64)
    model_probs, probe_probs = np.asarray(model_probs, np.float64), np.asarray(probe_probs, np.float64)
    fine_tuned, probe = auroc(y_true, model_probs, positive_index), auroc(y_true, probe_probs, positive_index)
    pairs = paired_resamples(y_true, model_probs, probe_probs, positive_index, n_boot, seed)
    return {
        "fine_tuned_auroc": fine_tuned,
        "probe_auroc": probe,
        "probe_auroc_ci": percentile_interval(pairs[:, 1]),
        "auroc_gain": fine_tuned - probe,
        "auroc_gain_ci": percentile_interval(pairs[:, 0] - pairs[:, 1]),
        "bootstrap_valid": len(pairs),
    }


def linear_probe(
    ckpt: dict[str, Any],
    prepared_dir: str | Path,
    params: Params,
    y_test: np.ndarray,
    model_probs: np.ndarray,
    device: Any = None,
) -> dict[str, Any]:
    """evaluation.json's `linear_probe`: how the probe was built and fitted, its test metrics (the
    model's set), the fine-tuned model's AUROC (`model_probs`, the shipped probabilities on the test
    split) and the gain over the probe with its paired bootstrap interval."""
    ev, pos, classes = params.evaluate, params.positive_index, list(ckpt["classes"])
    probe = fit_probe(ckpt, prepared_dir, params, device)
    # The probe's operating point is chosen on val as the model's is (evaluate.operating_point).
    threshold = (
        calibrate.choose_threshold(ev.threshold_method, probe.y_val, probe.val_probs[:, pos], pos, ev.threshold)
        if len(classes) == 2
        else ev.threshold
    )
    # The probe's own AUROC interval comes from the paired resamples (the ones compute_metrics would draw),
    # which score it anyway: one bootstrap, not two.
    metrics = compute_metrics(y_test, probe.test_probs, classes, pos, threshold, 0, ev.seed)
    gain = auroc_gain(y_test, model_probs, probe.test_probs, pos, ev.bootstrap, ev.seed)
    metrics.update(
        auroc_ci=gain["probe_auroc_ci"], bootstrap_resamples=ev.bootstrap, bootstrap_valid=gain["bootstrap_valid"]
    )
    record = {
        "start": probe.start,
        "head": "logistic regression on standardised pooled features",
        "fitted_on": "train",
        "C": probe.C,
        "C_grid": list(C_GRID),
        "C_chosen_on": "val",
        "val_auroc": probe.val_auroc if math.isfinite(probe.val_auroc) else None,
        "n_features": probe.n_features,
        "n_train": probe.n_train,
        "n_val": probe.n_val,
        "tta": ev.tta,
        "threshold_method": ev.threshold_method if len(classes) == 2 else None,
        **{k: v for k, v in metrics.items() if k not in ("classes", "positive_class", "averaging")},
        "fine_tuned_auroc": gain["fine_tuned_auroc"],
        "auroc_gain": gain["auroc_gain"],
        "auroc_gain_ci": gain["auroc_gain_ci"],
        "auroc_gain_ci_level": CI_LEVEL,
        "auroc_gain_bootstrap_valid": gain["bootstrap_valid"],
    }
    log_probe(record)
    return record


def log_probe(record: dict[str, Any]) -> None:
    lo, hi = record["auroc_gain_ci"]
    ci = f"{lo:+.3f} to {hi:+.3f}" if lo is not None else "n/a"
    log.info(
        "linear probe (%s, frozen; logistic regression C=%g chosen on val): test auroc=%.3f; fine-tuned %.3f; "
        "gain %+.3f (95%% CI %s, paired bootstrap, %d valid resamples)",
        record["start"]["description"],
        record["C"],
        record["auroc"],
        record["fine_tuned_auroc"],
        record["auroc_gain"],
        ci,
        record["auroc_gain_bootstrap_valid"],
    )
