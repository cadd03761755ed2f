"""Logit standardisation (Sun et al. 2024): Hinton's KD on z-scored logits."""

from __future__ import annotations

import torch

from kdrun.losses.base import LOSSES
from kdrun.losses.kd import KD


def zscore(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Each row minus its mean, divided by its standard deviation (over the classes)."""
    return (logits - logits.mean(1, keepdim=True)) / (eps + logits.std(1, keepdim=True))


@LOSSES.register("kd_ls")
class LogitStandardKD(KD):
    """Logit standardisation, Sun et al. 2024 (CVPR), "Logit Standardization in Knowledge
    Distillation": the student need not match the teacher's logit *range*, only their
    relations, so both sides are z-scored per sample before the temperature softmax.

    L = alpha * T^2 * KL(softmax(Z(t) / T) || softmax(Z(s) / T)) + (1 - alpha) * CE(y, s),
    Z(z) = (z - mean(z)) / (std(z) + 1e-7) over the classes; CE on the raw logits.
    """

    soft_view = staticmethod(zscore)

    def __init__(self, T: float = 2.0, alpha: float = 0.9, t2_scale: bool = True):
        super().__init__(T, alpha, t2_scale)
