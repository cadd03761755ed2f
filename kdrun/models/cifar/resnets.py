"""The CIFAR ResNets of the standard KD benchmark (CRD, ICLR 2020, and every paper since;
RepDistiller's and mdistiller's ``models/resnet.py`` and ``models/wrn.py``):

- resnet8 ... resnet110 with widths 16-16-32-64, and resnet8x4 / resnet32x4 with
  widths 32-64-128-256, of post-activation basic blocks (depth = 6n + 2);
- the wide ResNets wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2 (Zagoruyko & Komodakis 2016)
  of pre-activation blocks (depth = 6n + 4, widths 16, 16k, 32k, 64k);
- ResNet50 in their CIFAR variant (``models/resnetv2.py``): ImageNet's bottleneck stages
  (3, 4, 6, 3 blocks, widths 64-128-256-512 x 4) after a 3x3 stride-1 stem, no max pool.

Module names follow those projects (``conv1``, ``layer1.0.conv1``,
``layer2.0.downsample.0``, ``block1.layer.0.convShortcut``, ``layer1.0.shortcut.0``,
``fc``, ``linear``, ...), so a state dict saved by them loads strictly
(``teacher.checkpoint=``). Feature taps by name: each stage (``layer1``..``layer3`` or
``layer4``, or ``block1``..``block3``), ``penultimate``, and each stage's pre-activation
``<stage>.preact`` (``preact_taps``), as the references' ``preact=True`` reads it:
the ResNets' last block before its final ReLU (every block has a ``preact`` tap); the
wide ResNets' stage output after the next batch norm, before its ReLU (mdistiller's
``wrn.py``: ``block2.layer[0].bn1(f1)``, ..., ``bn1(f3)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.models.base import MODELS, he_init, image_builder

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
        self.preact = nn.Identity()  # a tap: the sum before the final ReLU

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(self.preact(out + shortcut))


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
        self.preact_taps = {f"layer{i}.preact": f"layer{i}.{blocks - 1}.preact" for i in (1, 2, 3)}
        _add_head(self, widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.penultimate(self.avgpool(x)))


def _add_head(model: nn.Module, width: int, num_classes: int) -> None:
    """Global average pool, ``penultimate`` (the pooled features, a tap), the classifier;
    convolutions initialised as the references do (He normal, fan-out)."""
    model.avgpool = nn.AdaptiveAvgPool2d(1)  # the references' 8x8 pool on 32x32 inputs
    model.penultimate = nn.Flatten()
    model.fc = nn.Linear(width, num_classes)
    he_init(model)


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv twice; a 1x1 projection of the activated
    input when the width changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.convShortcut = (nn.Conv2d(c_in, c_out, 1, stride, bias=False)  # noqa: N815
                             if c_in != c_out else None)  # (the reference's name)

    def forward(self, x):
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        return out + (x if self.convShortcut is None else self.convShortcut(activated))


class WideStage(nn.Module):
    def __init__(self, blocks: int, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(c_in if i == 0 else c_out, c_out,
                                               stride if i == 0 else 1) for i in range(blocks)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, in_channels: int, num_classes: int):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth {depth} is not 6n + 4")
        blocks, widths = (depth - 4) // 6, (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = WideStage(blocks, widths[0], widths[1], 1)
        self.block2 = WideStage(blocks, widths[1], widths[2], 2)
        self.block3 = WideStage(blocks, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        # each stage's output as the next batch norm gives it to its ReLU
        self.preact_taps = {"block1.preact": "block2.layer.0.bn1",
                            "block2.preact": "block3.layer.0.bn1", "block3.preact": "bn1"}
        _add_head(self, widths[3], num_classes)
        nn.init.zeros_(self.fc.bias)  # as the reference initialises it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.penultimate(self.avgpool(self.relu(self.bn1(x)))))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (with the stride), 1x1 expand by 4, each with BN; a projected
    shortcut when the shape changes (an empty ``shortcut`` otherwise, as the reference)."""

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        c_out = 4 * planes
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))
        self.preact = nn.Identity()  # a tap: the sum before the final ReLU

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        return F.relu(self.preact(out + self.shortcut(x)))


class CifarResNet50(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, blocks=(3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        c_in = 64
        for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
            stride = 1 if stage == 1 else 2
            layers = [Bottleneck(c_in if i == 0 else 4 * planes, planes, stride if i == 0 else 1)
                      for i in range(n)]
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
            c_in = 4 * planes
        self.preact_taps = {f"layer{i}.preact": f"layer{i}.{n - 1}.preact"
                            for i, n in enumerate(blocks, start=1)}
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.penultimate = nn.Flatten()
        self.linear = nn.Linear(c_in, num_classes)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(self.penultimate(self.avgpool(x)))


def _resnet(name: str, depth: int, widths) -> None:
    make = lambda c, k: CifarResNet(depth, widths, c, k)  # noqa: E731
    MODELS.register(name)(image_builder(name, make, f"CIFAR {name}: depth {depth}, widths "
                                               f"{'-'.join(map(str, widths))}."))


def _wrn(depth: int, widen: int) -> None:
    name = f"wrn_{depth}_{widen}"
    make = lambda c, k: WideResNet(depth, widen, c, k)  # noqa: E731
    MODELS.register(name)(image_builder(name, make, f"Wide ResNet {depth}-{widen} for CIFAR."))


for _name, _depth in DEPTHS.items():
    _resnet(_name, _depth, NARROW)
_resnet("resnet8x4", 8, WIDE)
_resnet("resnet32x4", 32, WIDE)
for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _wrn(_depth, _widen)
MODELS.register("ResNet50")(image_builder(
    "ResNet50", CifarResNet50, "CIFAR ResNet50 of the KD benchmark: bottleneck stages 3-4-6-3, "
    "a 3x3 stride-1 stem."))
