"""The CIFAR VGGs of the standard KD benchmark (CRD, ICLR 2020; RepDistiller's and
mdistiller's ``models/vgg.py``, in the batch-norm variants their model tables use):
five blocks of 3x3 convolutions, each but a block's last followed by BN and ReLU (the
last has BN only; the ReLU is applied outside the block, by ``relu0``..``relu4``, so a
tap on ``block1`` reads its pre-activation, ``block1.preact`` the same, and ``relu1``
the activated stage, as the references' ``preact_feats`` and ``feats``); 2x2 max
pools after the first three blocks (and the fourth on 64-pixel inputs), global average
pooling, one linear classifier and no hidden FC layers.

Module names follow those projects (``block0.0``, ``block0.1``, ..., ``classifier``),
so a state dict saved by them loads strictly. Feature taps: ``block0``..``block4``
and ``penultimate``, ``relu0``..``relu4``, ``block0.preact``..``block4.preact``.
"""

from __future__ import annotations

import torch
from torch import nn

from kdrun.models.base import MODELS, he_init, image_builder

# convolution widths per block (the reference's configurations S, A, B, D, E)
VGG_BLOCKS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def _block(c_in: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True)]
        c_in = width
    return nn.Sequential(*layers[:-1])  # the block's last ReLU is the forward's


class CifarVGG(nn.Module):
    def __init__(self, blocks, in_channels: int, num_classes: int):
        super().__init__()
        c_in = in_channels
        for i, widths in enumerate(blocks):
            setattr(self, f"block{i}", _block(c_in, widths))
            c_in = widths[-1]
            setattr(self, f"relu{i}", nn.ReLU())  # parameterless: a tap on the activated stage
        self.preact_taps = {f"block{i}.preact": f"block{i}" for i in range(len(blocks))}
        for i in range(4):
            setattr(self, f"pool{i}", nn.MaxPool2d(2, 2))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.penultimate = nn.Flatten()
        self.classifier = nn.Linear(c_in, num_classes)
        he_init(self, linear_std=0.01)  # as the reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        large = x.shape[2] == 64  # the reference pools after block 3 on 64-pixel inputs only
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if large:
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        return self.classifier(self.penultimate(self.pool4(x)))


for _name, _blocks in VGG_BLOCKS.items():
    MODELS.register(_name)(image_builder(
        _name, lambda c, k, b=_blocks: CifarVGG(b, c, k),
        f"CIFAR {_name} with batch norm: conv widths "
        f"{'-'.join('x'.join(map(str, b)) for b in _blocks)}."))
