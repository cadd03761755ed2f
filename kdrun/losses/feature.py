"""Feature-based distillation: the student matches the teacher's intermediate
features, read by name with forward hooks (kdrun/train/features.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.checks import layer_name
from kdrun.errors import ConfigError
from kdrun.losses.base import (
    KD_RULES,
    LOSSES,
    WEIGHT,
    DistillationLoss,
    kd_loss,
    optional_floats,
)


class FeatureLoss(DistillationLoss):
    """A method that reads ``student_layer`` of the student and ``teacher_layer`` of
    the teacher, plus, optionally, Hinton's KD: L = kd_loss(alpha, T) + its own term.
    With alpha=0 (their papers' setting unless stated) that is CE + its own term; with
    alpha=null, ce_weight * CE + kd_weight * T^2 * KD + its own term (RepDistiller's
    -r, -a: e.g. CRD+KD is CE 1 + KD 1 + CRD 0.8)."""

    reads_features = True
    config_rules = {"student_layer": layer_name, "teacher_layer": layer_name, **KD_RULES}

    def __init__(self, student_layer: str, teacher_layer: str, alpha: float | None, T: float,
                 ce_weight: float | None = None, kd_weight: float | None = None):
        super().__init__()
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.alpha, self.ce_weight, self.kd_weight = optional_floats(alpha, ce_weight, kd_weight)
        self.T = float(T)

    def base(self, student_logits, teacher_logits, labels) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, labels, self.T, self.alpha,
                       masked=not self.all_labelled, ce_weight=self.ce_weight,
                       kd_weight=self.kd_weight)


def regressor(student_shape: tuple, teacher_shape: tuple) -> nn.Module:
    """Maps student features to the teacher's shape: a 1x1 convolution when both are
    feature maps of the same spatial size, else a linear map of the flattened features."""
    if len(student_shape) == len(teacher_shape) >= 2 and student_shape[1:] == teacher_shape[1:]:
        conv = nn.Conv2d if len(student_shape) == 3 else nn.Conv1d
        return conv(student_shape[0], teacher_shape[0], kernel_size=1)
    linear = nn.Linear(math.prod(student_shape), math.prod(teacher_shape))
    return nn.Sequential(nn.Flatten(), linear, nn.Unflatten(1, teacher_shape))


@LOSSES.register("fitnet")
class FitNet(FeatureLoss):
    """FitNets, Romero et al. 2015 (ICLR), "FitNets: Hints for Thin Deep Nets": a learned
    regressor maps the student's hint layer to the teacher's guided layer, and the
    student is trained to make it match.

    L = (1 - alpha) * CE + alpha * T^2 * KD + beta * MSE(regressor(f_s), f_t), in one
    stage with the regressor trained alongside the student (as mdistiller does; the
    paper pre-trains the hint first). beta=100 as in mdistiller's CIFAR setting.
    """

    config_rules = {**FeatureLoss.config_rules, "beta": WEIGHT}

    def __init__(self, beta: float = 100.0, student_layer: str = "penultimate",
                 teacher_layer: str = "penultimate", alpha: float | None = 0.0, T: float = 4.0,
                 ce_weight: float | None = None, kd_weight: float | None = None):
        super().__init__(student_layer, teacher_layer, alpha, T, ce_weight, kd_weight)
        self.beta = float(beta)
        self.regressor: nn.Module | None = None

    def prepare(self, student_shape, teacher_shape) -> None:
        self.regressor = regressor(student_shape, teacher_shape)

    def forward(self, student_logits, teacher_logits, labels, student_feature=None,
                teacher_feature=None):
        hint = F.mse_loss(self.regressor(student_feature), teacher_feature.detach())
        return self.base(student_logits, teacher_logits, labels) + self.beta * hint


def attention_map(feature: torch.Tensor) -> torch.Tensor:
    """Spatial attention of a (N, C, ...) feature map: the channel mean of the squared
    activations, flattened and L2-normalised per sample (the authors' code, p=2)."""
    return F.normalize(feature.pow(2).mean(1).flatten(1), dim=1)


@LOSSES.register("at")
class AT(FeatureLoss):
    """Attention transfer, Zagoruyko & Komodakis 2017 (ICLR), "Paying More Attention
    to Attention": the student matches where the teacher's feature maps are active.

    L = (1 - alpha) * CE + alpha * T^2 * KD + beta / 2 * mean((Q_s - Q_t)^2), with
    Q = attention_map(features); beta = 1000 as in the paper. The larger map is
    average-pooled to the smaller one's size when they differ.
    """

    config_rules = {**FeatureLoss.config_rules, "beta": WEIGHT}

    def __init__(self, beta: float = 1000.0, student_layer: str = "features",
                 teacher_layer: str = "features", alpha: float | None = 0.0, T: float = 4.0,
                 ce_weight: float | None = None, kd_weight: float | None = None):
        super().__init__(student_layer, teacher_layer, alpha, T, ce_weight, kd_weight)
        self.beta = float(beta)

    def prepare(self, student_shape, teacher_shape) -> None:
        for role, layer, shape in (("student", self.student_layer, student_shape),
                                   ("teacher", self.teacher_layer, teacher_shape)):
            if len(shape) < 2:
                raise ConfigError(f"loss.{role}_layer", layer,
                                  f"attention transfer needs a convolutional feature map, but "
                                  f"this layer gives flat features {shape}: use a cnn {role}")

    def forward(self, student_logits, teacher_logits, labels, student_feature=None,
                teacher_feature=None):
        s, t = student_feature, teacher_feature.detach()
        size = tuple(min(a, b) for a, b in zip(s.shape[2:], t.shape[2:]))
        pool = F.adaptive_avg_pool2d if s.ndim == 4 else F.adaptive_avg_pool1d
        s, t = (pool(f, size) if f.shape[2:] != size else f for f in (s, t))
        term = (attention_map(s) - attention_map(t)).pow(2).mean()
        return self.base(student_logits, teacher_logits, labels) + self.beta / 2 * term


@LOSSES.register("hidden_cosine")
class HiddenCosine(FeatureLoss):
    """The cosine embedding loss of DistilBERT (Sanh et al. 2019): the student's hidden
    states point where the teacher's do, position by position for a language model (the
    rows of kdrun/train/tokens.py), example by example otherwise.

    L = (1 - alpha) * CE + alpha * T^2 * KD + beta * mean(1 - cos(P h_s, h_t)), with P a
    learned linear map when the widths differ (DistilBERT's student shares the teacher's
    width, and P is then the identity). The default layers, ``penultimate``, are the
    final hidden states (the input of the LM head).
    """

    config_rules = {**FeatureLoss.config_rules, "beta": WEIGHT}

    def __init__(self, beta: float = 1.0, student_layer: str = "penultimate",
                 teacher_layer: str = "penultimate", alpha: float | None = 0.5, T: float = 2.0,
                 ce_weight: float | None = None, kd_weight: float | None = None):
        super().__init__(student_layer, teacher_layer, alpha, T, ce_weight, kd_weight)
        self.beta = float(beta)
        self.project: nn.Module | None = None

    def prepare(self, student_shape, teacher_shape) -> None:
        s, t = math.prod(student_shape), math.prod(teacher_shape)  # a row's (or an example's)
        self.project = nn.Identity() if s == t else nn.Linear(s, t, bias=False)

    def forward(self, student_logits, teacher_logits, labels, student_feature=None,
                teacher_feature=None):
        s = self.project(student_feature.flatten(1))
        term = (1 - F.cosine_similarity(s, teacher_feature.detach().flatten(1), dim=1)).mean()
        return self.base(student_logits, teacher_logits, labels) + self.beta * term
