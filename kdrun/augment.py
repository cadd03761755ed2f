"""Data augmentation done batched on the training device: no per-sample Python.

Configured per data set (``dataset.augment``); image data sets only. The random
draws come from a CPU generator the training loop seeds and checkpoints, so an
augmented run is as reproducible and resumable as an unaugmented one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kdrun.errors import ConfigError

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad (N, C, H, W) images by ``padding`` and cut a random H x W window from each."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy, dx = (torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
              for _ in range(2))
    rows = (torch.arange(h, device=x.device) + dy[:, None])[:, :, None]  # (N, H, 1)
    cols = (torch.arange(w, device=x.device) + dx[:, None])[:, None, :]  # (N, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()  # (N,H,W,C) -> NCHW


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each (N, C, H, W) image left-right with probability 1/2."""
    flip = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def make_augment(augment_cfg, input_shape) -> Augment | None:
    """The configured augmentation as one function of (batch, generator), or None."""
    if augment_cfg is None or not (augment_cfg.crop_padding or augment_cfg.hflip):
        return None
    if len(input_shape) != 3:
        raise ConfigError("dataset.augment", dict(augment_cfg),
                          f"crop and flip need images (C, H, W); this data is {tuple(input_shape)}")

    def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if augment_cfg.crop_padding:
            x = random_crop(x, augment_cfg.crop_padding, generator)
        if augment_cfg.hflip:
            x = random_hflip(x, generator)
        return x

    return augment
