"""The mobile students of the standard KD benchmark, in the CIFAR variants of CRD (ICLR
2020) and every paper since (RepDistiller's and mdistiller's ``models/``):

- ``MobileNetV2``: their ``mobile_half``, MobileNetV2 with expansion 6 and width 0.5
  (Sandler et al. 2018; the variant of Route Constrained Optimization), a stride-2 stem;
- ``ShuffleV1``: ShuffleNet with 3 groups, stages of 240-480-960 channels (4, 8, 4
  bottlenecks; Zhang et al. 2018);
- ``ShuffleV2``: ShuffleNet V2 1x, stages of 116-232-464 channels (3, 7, 3 blocks after
  each down-sampling block) and a 1024-channel 1x1 conv (Ma et al. 2018).

Module names follow those projects, so their state dicts load strictly. The final
pooling is global average pooling, equal to the references' fixed pools on 32-pixel
inputs (theirs fail on other sizes). Feature taps: the stages (``blocks.0`` ..
``blocks.6``; ``layer1`` .. ``layer3``) and ``penultimate``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.models.base import MODELS, he_init, image_builder


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, 1x1 linear projection, each with BN; the input is
    added back when the shape allows (the reference keeps the expansion conv even at
    expansion 1)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int):
        super().__init__()
        mid = c_in * expansion
        self.residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


# (expansion, channels at width 1, blocks, first stride) per stage (Sandler et al., table 2)
MOBILENET_STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: float = 0.5,
                 expansion: int = 6):
        super().__init__()
        c_in = int(32 * width)
        self.conv1 = _conv_bn_relu(in_channels, c_in, 3, 2)
        stages = []
        for t, c, n, s in MOBILENET_STAGES:
            c_out, t = int(c * width), (t if t == 1 else expansion)
            stages.append(nn.Sequential(*[InvertedResidual(c_in if i == 0 else c_out, c_out,
                                                           s if i == 0 else 1, t)
                                          for i in range(n)]))
            c_in = c_out
        self.blocks = nn.ModuleList(stages)
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = _conv_bn_relu(c_in, last, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.penultimate = nn.Flatten()
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        he_init(self, linear_std=0.01)  # as the reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return self.classifier(self.penultimate(self.avgpool(self.conv2(x))))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, g * c, H, W] -> interleave the g groups' channels."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleBottleneck(nn.Module):
    """ShuffleNet unit: grouped 1x1, channel shuffle, 3x3 depthwise, grouped 1x1; at
    stride 2 the average-pooled input is concatenated instead of added."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int, stem: int):
        super().__init__()
        mid = c_out // 4
        self.stride, self.first_groups = stride, 1 if c_in == stem else groups
        self.conv1 = nn.Conv2d(c_in, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, 2, 1)) if stride == 2 else nn.Sequential()

    def forward(self, x):
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


STEM = 24  # the stem width of both ShuffleNets


class ShuffleNet(nn.Module):
    """The frame both ShuffleNets share: a 1x1 stem of STEM channels with BN and ReLU,
    three stages ``layer1``..``layer3`` (built by the subclass), ``neck`` (identity
    unless overridden), global average pooling and the classifier ``linear``."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, STEM, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM)

    def add_head(self, width: int, num_classes: int) -> None:
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.penultimate = nn.Flatten()
        self.linear = nn.Linear(width, num_classes)

    def neck(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.neck(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(self.penultimate(self.avgpool(x)))


class ShuffleV1(ShuffleNet):
    def __init__(self, in_channels: int, num_classes: int, widths=(240, 480, 960),
                 blocks=(4, 8, 4), groups: int = 3):
        super().__init__(in_channels)
        c_in = STEM
        for stage, (width, n) in enumerate(zip(widths, blocks), start=1):
            units = []
            for i in range(n):  # the first unit concatenates its input: it adds the rest
                units.append(ShuffleBottleneck(c_in, width - (c_in if i == 0 else 0),
                                               2 if i == 0 else 1, groups, STEM))
                c_in = width
            setattr(self, f"layer{stage}", nn.Sequential(*units))
        self.add_head(c_in, num_classes)


class ShuffleV2Block(nn.Module):
    """Half the channels pass through; the other half: 1x1, 3x3 depthwise, 1x1; then the
    halves are concatenated and shuffled."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x):
        kept, x = x.split(x.shape[1] // 2, dim=1)
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([kept, out], 1), 2)


class ShuffleV2Down(nn.Module):
    """Down-sampling unit: both branches stride 2 (left: depthwise then 1x1; right: 1x1,
    depthwise, 1x1), concatenated and shuffled."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        mid = c_out // 2
        self.conv1 = nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv2 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleV2(ShuffleNet):
    def __init__(self, in_channels: int, num_classes: int, widths=(116, 232, 464),
                 blocks=(3, 7, 3), last: int = 1024):
        super().__init__(in_channels)
        c_in = STEM
        for stage, (width, n) in enumerate(zip(widths, blocks), start=1):
            units = [ShuffleV2Down(c_in, width), *(ShuffleV2Block(width) for _ in range(n))]
            setattr(self, f"layer{stage}", nn.Sequential(*units))
            c_in = width
        self.conv2 = nn.Conv2d(c_in, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.add_head(last, num_classes)

    def neck(self, x: torch.Tensor) -> torch.Tensor:
        """A 1x1 convolution to ``last`` channels, with BN and ReLU."""
        return F.relu(self.bn2(self.conv2(x)))


MODELS.register("MobileNetV2")(image_builder(
    "MobileNetV2", MobileNetV2, "CIFAR MobileNetV2 of the KD benchmark (mobile_half: "
    "expansion 6, width 0.5)."))
MODELS.register("ShuffleV1")(image_builder(
    "ShuffleV1", ShuffleV1, "CIFAR ShuffleNet V1 of the KD benchmark (3 groups, 240-480-960)."))
MODELS.register("ShuffleV2")(image_builder(
    "ShuffleV2", ShuffleV2, "CIFAR ShuffleNet V2 1x of the KD benchmark (116-232-464, 1024)."))
