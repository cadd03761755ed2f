"""Logit standardisation (Sun et al. 2024): Hinton's KD on z-scored logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.checks import boolean
from kdrun.losses.base import KD_RULES, LOSSES, DistillationLoss, soft_kl


def zscore(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Each row minus its mean, divided by its standard deviation (over the classes)."""
    return (logits - logits.mean(1, keepdim=True)) / (eps + logits.std(1, keepdim=True))


@LOSSES.register("kd_ls")
class LogitStandardKD(DistillationLoss):
    """Logit standardisation, Sun et al. 2024 (CVPR), "Logit Standardization in Knowledge
    Distillation": the student need not match the teacher's logit *range*, only their
    relations, so both sides are z-scored per sample before the temperature softmax.

    L = alpha * T^2 * KL(softmax(Z(t) / T) || softmax(Z(s) / T)) + (1 - alpha) * CE(y, s),
    Z(z) = (z - mean(z)) / (std(z) + 1e-7) over the classes; CE on the raw logits.
    """

    config_rules = {**KD_RULES, "t2_scale": boolean}

    def __init__(self, T: float = 2.0, alpha: float = 0.9, t2_scale: bool = True):
        super().__init__()
        self.T, self.alpha, self.t2_scale = float(T), float(alpha), bool(t2_scale)

    def forward(self, student_logits, teacher_logits, labels, student_feature=None,
                teacher_feature=None):
        soft = soft_kl(zscore(student_logits), zscore(teacher_logits), self.T)
        soft_weight = self.alpha * (self.T**2 if self.t2_scale else 1.0)
        return soft_weight * soft + (1 - self.alpha) * F.cross_entropy(student_logits, labels)
