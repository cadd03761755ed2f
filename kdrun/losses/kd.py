"""Hinton's KD and the cross-entropy control (the formula itself: base.kd_loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.checks import boolean
from kdrun.losses.base import (
    KD_RULES,
    LOSSES,
    Averaging,
    DistillationLoss,
    kd_loss,
    optional_floats,
    term_weights,
    weighted_terms,
    zscore,
)


@torch.no_grad()
def soft_target_entropy(teacher_logits: torch.Tensor, T: float, chunk_rows: int = 4096) -> float:
    """Mean entropy (nats) of the teacher's softened distributions softmax(t / T):
    how soft the targets really are at this temperature (max: log of the class count);
    ``chunk_rows`` rows at a time, so that a language model's cache is never copied whole."""
    rows = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    total = torch.zeros((), dtype=torch.float64)
    for part in rows.split(chunk_rows):
        log_p = F.log_softmax(part.float() / T, dim=-1)
        total += (-(log_p.exp() * log_p).sum(-1)).double().sum().cpu()
    return float(total / max(len(rows), 1))


@LOSSES.register("kd")
class KD(DistillationLoss):
    """Knowledge distillation, Hinton, Vinyals & Dean 2015, "Distilling the Knowledge
    in a Neural Network" (arXiv:1503.02531).

    L = alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE(y, s)

    ``alpha`` weights the *teacher* (soft) term, as in the paper. Keras' KD example
    and torchdistill's KDLoss put alpha on the hard-label term instead. With
    ``alpha=None``, ``ce_weight`` and ``kd_weight`` weight the two terms freely
    (mdistiller's CE_WEIGHT and KD_WEIGHT): L = kd_weight * T^2 * KL + ce_weight * CE. The T^2
    factor (``t2_scale``) keeps the soft term's gradients on the hard term's scale
    as T changes. ``logit_std`` z-scores both sides' logits per sample before the
    temperature softmax of the soft term (Sun et al. 2024, CVPR; ``loss=kd_ls``).
    """

    config_rules = {**KD_RULES, "t2_scale": boolean, "logit_std": boolean}
    chunks_rows = True

    def __init__(self, T: float = 4.0, alpha: float | None = 0.9, t2_scale: bool = True,
                 logit_std: bool = False, ce_weight: float | None = None,
                 kd_weight: float | None = None):
        super().__init__()
        self.T, self.t2_scale, self.logit_std = float(T), bool(t2_scale), bool(logit_std)
        self.alpha, self.ce_weight, self.kd_weight = optional_floats(alpha, ce_weight, kd_weight)
        self.soft_view = zscore if self.logit_std else None  # both sides, soft term only

    def forward(self, student_logits, teacher_logits, labels, student_feature=None,
                teacher_feature=None):
        return kd_loss(student_logits, teacher_logits, labels, self.T, self.alpha,
                       self.t2_scale, self.soft_view, masked=not self.all_labelled,
                       ce_weight=self.ce_weight, kd_weight=self.kd_weight,
                       chunk_rows=self.chunk_rows)

    def objective(self, over: Averaging) -> str:
        soft = "KL(p_t || p_s)" + (" of z-scored logits" if self.logit_std else "")
        return weighted_terms(soft, self.T, self.t2_scale,
                              term_weights(self.alpha, self.ce_weight, self.kd_weight), over)


@LOSSES.register("ce")
class CE(DistillationLoss):
    """Plain cross-entropy on the labels, no teacher: the distill stage then trains
    the student exactly as the scratch stage does (a control run)."""

    needs_teacher = False
    chunks_rows = True

    def forward(self, student_logits, teacher_logits, labels, student_feature=None,
                teacher_feature=None):
        return self.hard(student_logits, labels)

    def objective(self, over: Averaging) -> str:
        return f"CE(label, student) mean over {over.labelled} (no teacher)"
