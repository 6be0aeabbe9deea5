"""Stage 4: the training augmentation, and a preview grid of it for a human to check.

    medtune augment            # data/prepared -> reports/augment_preview.png

`build_transform` is what `train` applies to every training image (float (C, H, W) in [0, 1]);
the preview runs exactly that transform on a few training images, seeded by `augment.seed`, so
the PNG is byte-identical for the same data and params. Look at it before training: a flip or
rotation that makes no anatomical sense shows up here.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2

from components.common import atomic_path, stage_main
from components.data.preprocess import load_split
from components.params import AugmentParams, Params, load_params


class Clamp01(nn.Module):
    """Clamp to [0, 1]: the model's input contract, whatever the transforms before did."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 1.0)


def build_transform(params: AugmentParams) -> v2.Compose:
    """Random flips, one affine (rotation, translation, scale), brightness/contrast, noise, clamp.

    Acts on float tensors (C, H, W) in [0, 1], C = 1 or 3, and draws from torch's global RNG
    (seeded by train, and per DataLoader worker by torch). All strengths 0 -> identity.
    """
    steps: list[nn.Module] = []
    if params.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=params.hflip))
    if params.vflip > 0:
        steps.append(v2.RandomVerticalFlip(p=params.vflip))
    lo, hi = params.scale
    if params.rotation > 0 or params.translate > 0 or (lo, hi) != (1.0, 1.0):
        # Rotation, shift and zoom in ONE affine: one bilinear resampling blurs less than two.
        # fill=0: the padding of preprocess is black as well.
        steps.append(
            v2.RandomAffine(
                degrees=params.rotation,
                translate=(params.translate, params.translate),
                scale=(lo, hi),
                interpolation=v2.InterpolationMode.BILINEAR,
                fill=0.0,
            )
        )
    if params.brightness > 0 or params.contrast > 0:
        # ColorJitter handles 1-channel tensors too: contrast blends towards the image mean.
        steps.append(v2.ColorJitter(brightness=params.brightness or None, contrast=params.contrast or None))
    if params.noise_std > 0:
        steps.append(v2.GaussianNoise(mean=0.0, sigma=params.noise_std, clip=True))
    steps.append(Clamp01())
    return v2.Compose(steps)


def preview(prepared_dir: Path, out_png: Path, params: Params) -> Path:
    """Write a grid of `augment.preview_count` augmented training images to `out_png`."""
    from PIL import Image
    from torchvision.utils import make_grid

    prepared_dir, out_png = Path(prepared_dir), Path(out_png)
    images, _ = load_split(prepared_dir, "train")  # raises StageError on a missing or empty split
    count = min(params.augment.preview_count, len(images))
    transform = build_transform(params.augment)
    # fork_rng: the seed fixes the preview without disturbing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        gen = torch.Generator().manual_seed(params.augment.seed)
        rows = sorted(torch.randperm(len(images), generator=gen)[:count].tolist())
        torch.manual_seed(params.augment.seed)
        batch = torch.stack(
            [transform(torch.from_numpy(np.asarray(images[i], dtype=np.float32) / 255.0)) for i in rows]
        )
    grid = make_grid(batch, nrow=math.ceil(math.sqrt(count)), padding=2, pad_value=1.0)
    pixels = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    with atomic_path(out_png) as tmp:
        Image.fromarray(np.ascontiguousarray(pixels)).save(tmp, format="PNG")
    return out_png


def main(argv: Sequence[str] | None = None) -> int:
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--prepared", default="data/prepared", help="preprocess output folder (default: data/prepared)")
        p.add_argument(
            "--out",
            default="reports/augment_preview.png",
            help="preview PNG to write (default: reports/augment_preview.png)",
        )

    def run(args: argparse.Namespace) -> None:
        out = preview(Path(args.prepared), Path(args.out), load_params(args.params))
        print(f"wrote {out}")

    return stage_main("Stage 4: preview the training augmentation.", add_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
