"""augment.py: the transform (identity at zero strength, shape and range kept) and the preview stage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from components.data.augment import build_transform, main, preview
from components.params import AugmentParams, parse_params

ZERO = AugmentParams(hflip=0, vflip=0, rotation=0, translate=0, scale=[1.0, 1.0], brightness=0, contrast=0, noise_std=0)


def write_prepared(root: Path, n: int = 6, channels: int = 1, size: int = 16) -> Path:
    """A tiny data/prepared folder (train split only) in the format preprocess writes."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "train.npy", rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8))
    labels = ["normal", "lesion"] * (n // 2)
    pd.DataFrame(
        {
            "split": "train",
            "row": range(n),
            "path": [f"{lab}/{i}.png" for i, lab in enumerate(labels)],
            "sha256": ["0" * 64] * n,
            "label": labels,
            "label_index": [i % 2 for i in range(n)],
            "patient": [f"{i:016x}" for i in range(n)],
        }
    ).to_csv(root / "index.csv", index=False)
    (root / "meta.json").write_text(
        json.dumps(
            {
                "classes": ["normal", "lesion"],
                "image_size": size,
                "channels": channels,
                "window": "header",
                "input": "uint8 NCHW",
            }
        )
    )
    return root


@pytest.mark.parametrize("channels", [1, 3])
def test_zero_strengths_is_identity(channels):
    x = torch.rand(channels, 16, 16)
    assert torch.equal(build_transform(ZERO)(x), x)


@pytest.mark.parametrize("channels", [1, 3])
def test_strong_augmentation_keeps_shape_and_range_and_changes_the_image(channels):
    params = AugmentParams(
        hflip=1.0, vflip=1.0, rotation=30, translate=0.2, scale=[0.8, 1.2], brightness=0.5, contrast=0.5, noise_std=0.2
    )
    torch.manual_seed(0)
    x = torch.rand(channels, 16, 16)
    y = build_transform(params)(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert y.min() >= 0 and y.max() <= 1
    assert not torch.allclose(y, x)


def test_hflip_alone_flips():
    x = torch.rand(1, 8, 8)
    params = AugmentParams(**{**ZERO.__dict__, "hflip": 1.0})
    assert torch.equal(build_transform(params)(x), x.flip(-1))


def test_preview_is_a_deterministic_grid(tmp_path):
    prepared = write_prepared(tmp_path / "prepared", n=6)
    params = parse_params({"augment": {"preview_count": 4, "seed": 3}})
    state = torch.get_rng_state()
    a = preview(prepared, tmp_path / "a.png", params)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    torch.manual_seed(123)  # a different global state must not change the preview
    b = preview(prepared, tmp_path / "b.png", params)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)]
    assert digest[0] == digest[1]
    with Image.open(a) as img:  # 2x2 grid of 16 px images with 2 px padding
        assert img.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)
    other = preview(prepared, tmp_path / "c.png", parse_params({"augment": {"preview_count": 4, "seed": 4}}))
    assert hashlib.sha256(other.read_bytes()).hexdigest() != digest[0]


def test_main_writes_the_preview_and_reports_missing_data(tmp_path, capsys):
    prepared = write_prepared(tmp_path / "prepared", n=4, channels=3)
    (tmp_path / "params.yaml").write_text("augment:\n  preview_count: 16\n")
    out = tmp_path / "reports" / "augment_preview.png"
    argv = ["--params", str(tmp_path / "params.yaml"), "--prepared", str(prepared), "--out", str(out)]
    assert main(argv) == 0 and out.is_file()
    assert main([*argv[:2], "--prepared", str(tmp_path / "nowhere"), "--out", str(out)]) == 1
    assert "train.npy not found" in capsys.readouterr().err
