"""Hinton's KD, the cross-entropy control, and the KD part other methods add on.

Every loss is called as ``loss(student_logits, teacher_logits, labels,
student_feature, teacher_feature)``; see kdrun/losses/__init__.py.
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

    def forward(self, student_logits, teacher_logits, labels, student_feature=None,
                teacher_feature=None):
        hard = F.cross_entropy(student_logits, labels)
        if self.alpha == 0:
            return hard
        soft = soft_kl(student_logits, teacher_logits, self.T)
        soft_weight = self.alpha * (self.T**2 if self.t2_scale else 1.0)  # one multiply a step
        return soft_weight * soft + (1 - self.alpha) * hard


class WithKD(nn.Module):
    """Base of the methods that add their own term to cross-entropy and, optionally,
    Hinton's KD: L = (1 - alpha) * CE + alpha * T^2 * KL(p_t^T || p_s^T) + their term.
    With alpha=0 (their papers' setting unless stated) it is CE + their term."""

    needs_teacher = True

    def __init__(self, alpha: float = 0.0, T: float = 4.0):
        super().__init__()
        self.alpha, self.T = float(alpha), float(T)

    def base(self, student_logits, teacher_logits, labels) -> torch.Tensor:
        hard = F.cross_entropy(student_logits, labels)
        if self.alpha == 0:
            return hard
        soft = soft_kl(student_logits, teacher_logits, self.T) * self.T**2
        return (1 - self.alpha) * hard + self.alpha * soft


class CE(nn.Module):
    """Plain cross-entropy on the labels, no teacher: the distill stage then trains
    the student exactly as the scratch stage does (a control run)."""

    needs_teacher = False

    def forward(self, student_logits, teacher_logits, labels, student_feature=None,
                teacher_feature=None):
        return F.cross_entropy(student_logits, labels)
