"""ReviewKD, Chen, Liu, Zhao & Jia 2021 (CVPR), "Distilling Knowledge via Knowledge
Review": each teacher stage is matched by a fusion of the student's same stage and all
its deeper ones, built from the deepest down by attention-based fusion (ABF) modules,
and compared by a hierarchical context loss (HCL)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.checks import number
from kdrun.losses.base import LOSSES, WEIGHT
from kdrun.losses.feature import FeatureLoss

HCL_LEVELS = (4, 2, 1)  # the pyramid of average-pooled sizes the HCL also compares
MAX_MID_CHANNELS = 512  # the reference caps the fusion width at 512


def layer_names(v) -> str | None:
    ok = isinstance(v, list) and len(v) >= 2 and all(isinstance(n, str) and n for n in v)
    return None if ok else "must be a list of at least 2 layer names, shallow to deep"


def hcl_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Per stage: the MSE of the feature maps, plus the MSE after average pooling to 4x4,
    2x2 and 1x1 (those smaller than the map) weighted 1/2, 1/4, 1/8, normalised by the
    weights' sum; summed over stages."""
    total = 0.0
    for s, t in zip(student, teacher):
        loss, weight, weights = F.mse_loss(s, t), 1.0, 1.0
        for size in HCL_LEVELS:
            if size >= s.shape[2]:
                continue
            weight /= 2
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, size),
                                              F.adaptive_avg_pool2d(t, size))
            weights += weight
        total = total + loss / weights
    return total


class ABF(nn.Module):
    """Attention-based fusion: a 1x1 conv of the student's stage, blended with the
    (upsampled) fusion of the deeper stages by two per-pixel attention maps, resized to
    the teacher's stage and mapped to its channels by a 3x3 conv. Returns (output for
    this stage, fused features handed to the next shallower stage)."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, c_mid, 1, bias=False), nn.BatchNorm2d(c_mid))
        self.conv2 = nn.Sequential(nn.Conv2d(c_mid, c_out, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(c_out))
        self.att_conv = (nn.Sequential(nn.Conv2d(2 * c_mid, 2, 1), nn.Sigmoid())
                         if fuse else None)
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, deeper=None, out_size: int = 1):
        x = self.conv1(x)
        if self.att_conv is not None:
            deeper = F.interpolate(deeper, x.shape[2:], mode="nearest")
            attention = self.att_conv(torch.cat([x, deeper], 1))
            x = x * attention[:, :1] + deeper * attention[:, 1:]
        if x.shape[-1] != out_size:
            x = F.interpolate(x, (out_size, out_size), mode="nearest")
        return self.conv2(x), x


def as_map(feature: torch.Tensor) -> torch.Tensor:
    """A pooled (N, C) feature as a (N, C, 1, 1) map."""
    return feature[:, :, None, None] if feature.ndim == 2 else feature


@LOSSES.register("reviewkd")
class ReviewKD(FeatureLoss):
    """ReviewKD, Chen et al. 2021 (CVPR).

    ``student_layer`` and ``teacher_layer`` are lists of stages, shallow to deep, the
    last usually ``penultimate`` (the pooled feature, as a 1x1 map). From the deepest
    stage up, ABF modules fuse each student stage with the deeper ones; each fusion is
    compared with the teacher's stage by the HCL.

    L = CE + weight * min(epoch / warmup, 1) * sum over stages of HCL.
    As mdistiller and the authors' code: a warm-up of 20 epochs, a fusion width of
    min(512, the deepest student stage's channels), the student's stages as they are
    and the teacher's before their final ReLU (``layer1.preact``, ...; the pooled
    feature after it). The weight is set per pair (the CIFAR-100 experiments' recipes:
    5 for resnet32x4 -> resnet8x4, 0.6 for resnet56 -> resnet20, ...); 1 is
    mdistiller's default.
    """

    config_rules = {"student_layer": layer_names, "teacher_layer": layer_names,
                    "weight": WEIGHT, "warmup": number(0, integer=True)}

    def __init__(self, weight: float = 1.0, warmup: int = 20,
                 student_layer: list | None = None, teacher_layer: list | None = None):
        student = list(student_layer or ["layer1", "layer2", "layer3", "penultimate"])
        teacher = list(teacher_layer or ["layer1.preact", "layer2.preact", "layer3.preact",
                                         "penultimate"])
        super().__init__(student, teacher, alpha=0.0, T=1.0)
        self.weight, self.warmup, self.ramp = float(weight), int(warmup), 1.0

    def prepare(self, student_shape: list, teacher_shape: list) -> None:
        if len(student_shape) != len(teacher_shape):
            from kdrun.errors import ConfigError

            raise ConfigError("loss.teacher_layer", self.teacher_layer,
                              f"must name as many stages as loss.student_layer "
                              f"({len(student_shape)})")
        mid = min(MAX_MID_CHANNELS, student_shape[-1][0])
        last = len(student_shape) - 1
        # deepest first, as they run
        self.abfs = nn.ModuleList([ABF(s[0], mid, t[0], fuse=i < last) for i, (s, t) in
                                   enumerate(zip(student_shape, teacher_shape))][::-1])
        self.out_sizes = [t[-1] if len(t) == 3 else 1 for t in teacher_shape][::-1]

    def start_epoch(self, epoch: int) -> None:
        self.ramp = min(epoch / self.warmup, 1.0) if self.warmup else 1.0

    def forward(self, student_logits, teacher_logits, labels, student_feature=None,
                teacher_feature=None):
        stages = [as_map(f) for f in student_feature][::-1]
        fused, deeper = [], None
        for x, abf, size in zip(stages, self.abfs, self.out_sizes):
            out, deeper = abf(x, deeper, size)
            fused.insert(0, out)
        targets = [as_map(f).detach() for f in teacher_feature]
        return self.hard(student_logits, labels) + self.weight * self.ramp * hcl_loss(
            fused, targets)
