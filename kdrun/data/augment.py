"""Training-data augmentation, configured the same way for every image data set
(``dataset.augment``: crop_padding, hflip, rotation).

Data held in memory is augmented batched on the training device, with no per-sample
Python (``make_augment``); its random draws come from a CPU generator the training
loop seeds and checkpoints, so an augmented run is as reproducible and resumable as an
unaugmented one. Images read from disk are augmented per image by the DataLoader's
workers with torchvision's transforms of the same settings (``folder_transforms``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kdrun.checks import boolean, number
from kdrun.errors import ConfigError

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
# the keys of dataset.augment, with their checks
AUGMENT_RULES = {"crop_padding": number(0, integer=True), "hflip": boolean,
                 "rotation": number(0, 180)}


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


def random_rotation(x: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each (N, C, H, W) image about its centre by an angle drawn uniformly from
    [-degrees, degrees]; nearest-pixel sampling, zeros outside (as torchvision's
    RandomRotation does by default)."""
    angle = (torch.rand(len(x), generator=generator) * 2 - 1) * degrees * torch.pi / 180
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1),
                         torch.stack([sin, cos, zero], 1)], 1).to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def is_on(augment_cfg) -> bool:
    return augment_cfg is not None and any(augment_cfg.get(k) for k in AUGMENT_RULES)


def make_augment(augment_cfg, input_shape) -> Augment | None:
    """The configured augmentation of in-memory data as one function of (batch,
    generator), or None."""
    if not is_on(augment_cfg):
        return None
    if len(input_shape) != 3:
        raise ConfigError("dataset.augment", dict(augment_cfg),
                          f"crop, flip and rotation need images (C, H, W); this data is "
                          f"{tuple(input_shape)}")
    padding, hflip, degrees = (augment_cfg.get(k) for k in AUGMENT_RULES)

    def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if padding:
            x = random_crop(x, padding, generator)
        if hflip:
            x = random_hflip(x, generator)
        if degrees:
            x = random_rotation(x, degrees, generator)
        return x

    return augment


def folder_transforms(augment_cfg, image_size: int) -> list:
    """The same augmentation for images read from disk, as torchvision transforms of one
    PIL image, applied after resizing to ``image_size``. The crop pads by reflection
    (symmetric), which suits photographs better than black borders."""
    from torchvision import transforms as tf

    if not is_on(augment_cfg):
        return []
    padding, hflip, degrees = (augment_cfg.get(k) for k in AUGMENT_RULES)
    steps = []
    if padding:
        steps.append(tf.RandomCrop(image_size, padding=padding, pad_if_needed=True,
                                   padding_mode="symmetric"))
    if hflip:
        steps.append(tf.RandomHorizontalFlip())
    if degrees:
        steps.append(tf.RandomRotation(degrees))
    return steps
