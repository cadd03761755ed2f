"""The CIFAR ResNets of the standard KD benchmark (CRD, ICLR 2020, and every paper since;
RepDistiller's and mdistiller's ``models/resnet.py``): resnet8 ... resnet110 with
widths 16-16-32-64, and resnet8x4 / resnet32x4 with widths 32-64-128-256, all of basic
blocks (depth = 6n + 2: n blocks per stage).

Module names follow those projects (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``layer2.0.downsample.0``, ``fc``), so a state dict saved by them loads strictly
(``teacher.checkpoint=``). Feature taps by name: ``layer1`` .. ``layer3`` (the last
block of each stage is the stage's output) and ``penultimate``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import DataError
from kdrun.models import MODELS

NARROW = (16, 16, 32, 64)  # stem, stage 1, stage 2, stage 3
WIDE = (32, 64, 128, 256)  # the "x4" variants
DEPTHS = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32, "resnet44": 44,
          "resnet56": 56, "resnet110": 110}


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm, and a 1x1 projection when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, widths, in_channels: int, num_classes: int):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth {depth} is not 6n + 2")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        c_in = widths[0]
        for stage, (c_out, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            layers = [BasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                      for i in range(blocks)]
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
            c_in = c_out
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # the reference's AvgPool2d(8) on 32x32 input
        self.penultimate = nn.Flatten()
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.penultimate(self.avgpool(x)))


def _builder(name: str, depth: int, widths):
    def build(input_shape, num_classes):
        if len(input_shape) != 3:
            raise DataError(f"{name} needs images (C, H, W); this data is {tuple(input_shape)}")
        return CifarResNet(depth, widths, input_shape[0], num_classes)

    build.__doc__ = f"CIFAR {name}: depth {depth}, widths {'-'.join(map(str, widths))}."
    return build


for _name, _depth in DEPTHS.items():
    MODELS.register(_name)(_builder(_name, _depth, NARROW))
MODELS.register("resnet8x4")(_builder("resnet8x4", 8, WIDE))
MODELS.register("resnet32x4")(_builder("resnet32x4", 32, WIDE))
