"""Relation-based distillation: the student matches how the teacher relates the
examples of a batch to each other (distances, angles, similarities), so student and
teacher embeddings may have different sizes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.checks import number
from kdrun.losses.base import LOSSES, WEIGHT
from kdrun.losses.feature import FeatureLoss


def pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    squared = e.pow(2).sum(1)
    d = (squared[:, None] + squared[None, :] - 2 * e @ e.T).clamp_min(1e-12).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device))


def triplet_angles(e: torch.Tensor) -> torch.Tensor:
    """cos of the angle at each anchor j between the vectors to i and to k, all (i, j, k)."""
    unit = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
    return torch.bmm(unit, unit.transpose(1, 2)).flatten()


@LOSSES.register("rkd")
class RKD(FeatureLoss):
    """Relational knowledge distillation, Park et al. 2019 (CVPR): the student keeps
    the teacher's pairwise distances (normalised by their mean) and triplet angles.

    L = (1 - alpha) * CE + alpha * T^2 * KD + w_dist * smoothL1(d_s, d_t)
        + w_angle * smoothL1(angle_s, angle_t); the paper's weights 25 and 50.
    """

    config_rules = {**FeatureLoss.config_rules, "w_dist": WEIGHT, "w_angle": WEIGHT}

    def __init__(self, w_dist: float = 25.0, w_angle: float = 50.0,
                 student_layer: str = "penultimate", teacher_layer: str = "penultimate",
                 alpha: float | None = 0.0, T: float = 4.0,
                 ce_weight: float | None = None, kd_weight: float | None = None):
        super().__init__(student_layer, teacher_layer, alpha, T, ce_weight, kd_weight)
        self.w_dist, self.w_angle = float(w_dist), float(w_angle)

    def forward(self, student_logits, teacher_logits, labels, student_feature=None,
                teacher_feature=None):
        s, t = student_feature.flatten(1), teacher_feature.detach().flatten(1)
        d_s, d_t = pairwise_distances(s), pairwise_distances(t)
        d_s, d_t = d_s / d_s[d_s > 0].mean(), d_t / d_t[d_t > 0].mean()
        distance = F.smooth_l1_loss(d_s, d_t)
        angle = F.smooth_l1_loss(triplet_angles(s), triplet_angles(t))
        return (self.base(student_logits, teacher_logits, labels)
                + self.w_dist * distance + self.w_angle * angle)


def similarity(feature: torch.Tensor) -> torch.Tensor:
    """The batch's Gram matrix with each row L2-normalised (the paper's eq. 2; some
    popular code mistakenly uses an L1 norm here)."""
    f = feature.flatten(1)
    return F.normalize(f @ f.T, p=2, dim=1)


@LOSSES.register("sp")
class SP(FeatureLoss):
    """Similarity-preserving KD, Tung & Mori 2019 (ICCV): inputs that the teacher
    finds similar should be similar for the student.

    L = (1 - alpha) * CE + alpha * T^2 * KD + gamma * ||G_s - G_t||_F^2 / b^2,
    G = similarity(features), b the batch size; gamma = 3000 as in the paper.
    """

    config_rules = {**FeatureLoss.config_rules, "gamma": WEIGHT}

    def __init__(self, gamma: float = 3000.0, student_layer: str = "penultimate",
                 teacher_layer: str = "penultimate", alpha: float | None = 0.0, T: float = 4.0,
                 ce_weight: float | None = None, kd_weight: float | None = None):
        super().__init__(student_layer, teacher_layer, alpha, T, ce_weight, kd_weight)
        self.gamma = float(gamma)

    def forward(self, student_logits, teacher_logits, labels, student_feature=None,
                teacher_feature=None):
        g_s, g_t = similarity(student_feature), similarity(teacher_feature.detach())
        term = (g_s - g_t).pow(2).sum() / len(g_s) ** 2
        return self.base(student_logits, teacher_logits, labels) + self.gamma * term


def cosine_conditional(feature: torch.Tensor) -> torch.Tensor:
    """Conditional probabilities p(j | i) from the cosine kernel (cos + 1) / 2."""
    f = F.normalize(feature.flatten(1), p=2, dim=1)
    kernel = (f @ f.T + 1) / 2
    return kernel / kernel.sum(1, keepdim=True)


@LOSSES.register("pkt")
class PKT(FeatureLoss):
    """Probabilistic knowledge transfer, Passalis & Tefas 2018 (ECCV): match the
    probability distributions that a cosine kernel induces over the batch.

    L = (1 - alpha) * CE + alpha * T^2 * KD + beta * mean(P_t * log(P_t / P_s)),
    the mean over all batch pairs as in RepDistiller, whose beta = 30000 we keep.
    """

    config_rules = {**FeatureLoss.config_rules, "beta": WEIGHT,
                    "eps": number(0, lo_open=True)}

    def __init__(self, beta: float = 30000.0, student_layer: str = "penultimate",
                 teacher_layer: str = "penultimate", alpha: float | None = 0.0, T: float = 4.0,
                 eps: float = 1e-7,
                 ce_weight: float | None = None, kd_weight: float | None = None):
        super().__init__(student_layer, teacher_layer, alpha, T, ce_weight, kd_weight)
        self.beta, self.eps = float(beta), eps

    def forward(self, student_logits, teacher_logits, labels, student_feature=None,
                teacher_feature=None):
        p_s = cosine_conditional(student_feature)
        p_t = cosine_conditional(teacher_feature.detach())
        term = (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()
        return self.base(student_logits, teacher_logits, labels) + self.beta * term
