"""Logit standardisation (Sun et al. 2024): Hinton's KD on z-scored logits."""

from __future__ import annotations

from kdrun.losses.base import LOSSES
from kdrun.losses.kd import KD


@LOSSES.register("kd_ls")
class LogitStandardKD(KD):
    """Logit standardisation, Sun et al. 2024 (CVPR), "Logit Standardization in Knowledge
    Distillation": the student need not match the teacher's logit *range*, only their
    relations, so both sides are z-scored per sample before the temperature softmax.

    L = alpha * T^2 * KL(softmax(Z(t) / T) || softmax(Z(s) / T)) + (1 - alpha) * CE(y, s),
    Z(z) = (z - mean(z)) / (std(z) + 1e-7) over the classes; CE on the raw logits.
    The same as ``loss=kd loss.logit_std=true``, with the paper's T=2 as its default.
    The paper's CIFAR-100 runs weight the terms CE 0.1 + KD 9 (``alpha=None``,
    ``ce_weight=0.1``, ``kd_weight=9``: the CIFAR-100 experiments' recipes).
    """

    config_rules = {k: v for k, v in KD.config_rules.items() if k != "logit_std"}

    def __init__(self, T: float = 2.0, alpha: float | None = 0.9, t2_scale: bool = True,
                 ce_weight: float | None = None, kd_weight: float | None = None):
        super().__init__(T, alpha, t2_scale, logit_std=True, ce_weight=ce_weight,
                         kd_weight=kd_weight)
