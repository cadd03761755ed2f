"""The generator of data-free distillation (scheme=data_free): noise in, one batch of inputs
of the data's shape out. Not a classifier, so not in MODELS."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LEAKY_SLOPE = 0.2  # DFAD's generator (and DCGAN's)


class Generator(nn.Module):
    """DFAD's generator (Fang et al. 2019, "GeneratorA"), for images (C, H, W) and
    sequences (C, L) alike: a linear projection of the noise to ``2 * width`` channels at a
    quarter of the input's size, two nearest-neighbour upsamplings each followed by a 3-wide
    convolution, batch norm and a leaky ReLU, then a convolution to the input's channels, a
    tanh and a batch norm without affine parameters, so that each channel of a batch has
    mean 0 and variance 1, as standardised data has. Flat inputs (F,) get the same ending
    after two dense layers."""

    def __init__(self, input_shape, z_dim: int = 100, width: int = 64):
        super().__init__()
        self.input_shape, self.z_dim = tuple(input_shape), z_dim
        channels, *size = self.input_shape
        if not size:
            self.body = nn.Sequential(
                nn.Linear(z_dim, 4 * width), nn.BatchNorm1d(4 * width),
                nn.LeakyReLU(LEAKY_SLOPE), nn.Linear(4 * width, 4 * width),
                nn.BatchNorm1d(4 * width), nn.LeakyReLU(LEAKY_SLOPE),
                nn.Linear(4 * width, channels), nn.Tanh(), nn.BatchNorm1d(channels, affine=False))
            return
        conv, norm = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d)}[len(size)]
        self.sizes = [tuple(math.ceil(s / 4) for s in size), tuple(math.ceil(s / 2) for s in size),
                      tuple(size)]
        self.project = nn.Linear(z_dim, 2 * width * math.prod(self.sizes[0]))
        self.start = norm(2 * width)
        self.middle = nn.Sequential(conv(2 * width, 2 * width, 3, padding=1), norm(2 * width),
                                    nn.LeakyReLU(LEAKY_SLOPE))
        self.end = nn.Sequential(conv(2 * width, width, 3, padding=1), norm(width),
                                 nn.LeakyReLU(LEAKY_SLOPE), conv(width, channels, 3, padding=1),
                                 nn.Tanh(), norm(channels, affine=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "body"):
            return self.body(z)
        x = self.project(z).view(len(z), -1, *self.sizes[0])
        x = F.interpolate(self.start(x), size=self.sizes[1])
        return self.end(F.interpolate(self.middle(x), size=self.sizes[2]))


def sample_spread(x: torch.Tensor) -> float:
    """How much a batch's samples differ from each other: the mean over input positions of
    their standard deviation across the batch, over the batch's overall standard deviation
    (at most 1, about 1 for independent samples; 0 when every sample is the same: a
    collapse)."""
    flat = x.detach().reshape(len(x), -1).double()
    overall = flat.std(unbiased=False)  # population deviations: the ratio is at most 1
    return float(flat.std(0, unbiased=False).mean() / overall) if overall > 0 else 0.0
