"""Distillation losses: one small nn.Module per method, registered by name in LOSSES.

Every loss is called as ``loss(student_logits, teacher_logits, labels)``; a loss
whose ``needs_teacher`` is False ignores the teacher (and the pipeline then does
not compute teacher outputs for it). To add a method: write its class here, add
it to LOSSES, and add ``configs/loss/<name>.yaml``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """KL(p_t^T || p_s^T), summed over classes and averaged over the batch ("batchmean").

    Both sides are given as log-probabilities (``log_target=True``): no softmax is
    taken twice, and the teacher side cannot underflow to log(0).
    """
    log_p_student = F.log_softmax(student_logits / T, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / T, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


@torch.no_grad()
def soft_target_entropy(teacher_logits: torch.Tensor, T: float) -> float:
    """Mean entropy (nats) of the teacher's softened distributions softmax(t / T):
    how soft the targets really are at this temperature (max: log of the class count)."""
    log_p = F.log_softmax(teacher_logits.float() / T, dim=1)
    return float(-(log_p.exp() * log_p).sum(1).mean())


class KD(nn.Module):
    """Knowledge distillation, Hinton, Vinyals & Dean 2015, "Distilling the Knowledge
    in a Neural Network" (arXiv:1503.02531).

    L = alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE(y, s)

    ``alpha`` weights the *teacher* (soft) term, as in the paper. Keras' KD example
    and torchdistill's KDLoss put alpha on the hard-label term instead. The T^2
    factor (``t2_scale``) keeps the soft term's gradients on the hard term's scale
    as T changes.
    """

    needs_teacher = True

    def __init__(self, T: float = 4.0, alpha: float = 0.9, t2_scale: bool = True):
        super().__init__()
        self.T, self.alpha, self.t2_scale = float(T), float(alpha), bool(t2_scale)

    def forward(self, student_logits, teacher_logits, labels):
        hard = F.cross_entropy(student_logits, labels)
        if self.alpha == 0:
            return hard
        soft = soft_kl(student_logits, teacher_logits, self.T)
        if self.t2_scale:
            soft = soft * self.T**2
        return self.alpha * soft + (1 - self.alpha) * hard


class CE(nn.Module):
    """Plain cross-entropy on the labels, no teacher: the distill stage then trains
    the student exactly as the scratch stage does (a control run)."""

    needs_teacher = False

    def forward(self, student_logits, teacher_logits, labels):
        return F.cross_entropy(student_logits, labels)


LOSSES: dict[str, type[nn.Module]] = {"kd": KD, "ce": CE}


def build_loss(loss_cfg) -> nn.Module:
    """Build the loss named ``loss_cfg.name`` with the rest of ``loss_cfg`` as arguments."""
    params = dict(loss_cfg)
    return LOSSES[params.pop("name")](**params)
