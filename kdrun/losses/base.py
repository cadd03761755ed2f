"""What every distillation loss is and can do, declared once with explicit defaults.

A loss is called as ``loss(student_logits, teacher_logits, labels, student_feature,
teacher_feature)``. The pipeline and the trainer read the capabilities below and
never probe a loss for others. To add a loss: subclass ``DistillationLoss`` in a
module, decorate it with ``@LOSSES.register("name")``, declare ``config_rules`` for
its constructor's keys, and add ``configs/loss/<name>.yaml``; or keep the class in
your own package and name it by import path in your YAML (README: "Add your own").
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.checks import PROBABILITY, Check, number
from kdrun.data.labels import UNLABELED
from kdrun.registry import Registry


class DistillationLoss(nn.Module):
    needs_teacher: ClassVar[bool] = True  # False: the teacher is never asked for
    reads_features: ClassVar[bool] = False  # True: student_layer / teacher_layer are tapped
    reads_indices: ClassVar[bool] = False  # True: told the training set's size and each
    # batch's example indices (set_examples, set_batch), e.g. for a memory bank
    config_rules: ClassVar[dict[str, Check]] = {}  # constructor key -> its check
    student_layer: str | None = None
    teacher_layer: str | None = None
    # False while training on a transfer set (set by the trainer): some labels are
    # UNLABELED, and the hard-label term must be masked (hard_ce). True: plain CE.
    all_labelled: bool = True

    def hard(self, student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The hard-label cross-entropy: masked to the labelled examples (``hard_ce``)
        on a transfer set, plain ``F.cross_entropy`` (cheaper per step) otherwise."""
        if self.all_labelled:
            return F.cross_entropy(student_logits, labels)
        return hard_ce(student_logits, labels)

    def targets(self, labels: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The true class of each example; on a transfer set, the teacher's top class
        where there is no label (``target_classes``)."""
        return labels if self.all_labelled else target_classes(labels, teacher_logits)

    def prepare(self, student_shape: tuple, teacher_shape: tuple) -> None:
        """Called once before training with the tapped features' shapes (batch excluded)."""

    def attach(self, model: nn.Module) -> None:
        """Called once with the model being trained (a mutual loss reads its cohort)."""

    def set_examples(self, n: int) -> None:
        """Called once before training (and before a resume) with the number of training
        examples, when ``reads_indices``."""

    def set_batch(self, indices: torch.Tensor) -> None:
        """Called before each training step with its examples' indices, when
        ``reads_indices``."""

    def start_epoch(self, epoch: int) -> None:
        """Called at the start of every training epoch (e.g. a warm-up ramp)."""

    def forward(self, student_logits, teacher_logits, labels, student_feature=None,
                teacher_feature=None) -> torch.Tensor:
        raise NotImplementedError


LOSSES = Registry("loss", DistillationLoss)
TEMPERATURE = number(0, lo_open=True)
WEIGHT = number(0)  # a loss term's weight: any non-negative number
KD_RULES: dict[str, Check] = {"T": TEMPERATURE, "alpha": PROBABILITY}


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """KL(p_t^T || p_s^T), summed over classes and averaged over the batch ("batchmean").

    Both sides are given as log-probabilities (``log_target=True``): no softmax is
    taken twice, and the teacher side cannot underflow to log(0).
    """
    log_p_student = F.log_softmax(student_logits / T, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / T, dim=1)
    # F.kl_div(..., "batchmean", log_target=True) written out: torch.func.vmap has no
    # batching rule for kl_div, and batched students (kdrun/train/stacked.py) call this
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum() / len(student_logits)


def zscore(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Each row minus its mean, divided by its standard deviation over the classes (logit
    standardisation, Sun et al. 2024: the student need match only the teacher's logit
    relations, not their range)."""
    return (logits - logits.mean(1, keepdim=True)) / (eps + logits.std(1, keepdim=True))


def hard_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the labels, averaged over the batch's *labelled* examples
    (transfer-set examples carry UNLABELED, which F.cross_entropy ignores): the term
    keeps its scale whatever share of a batch has labels, and is 0 for a batch with
    none. On fully labelled batches it is exactly F.cross_entropy."""
    ce = F.cross_entropy(student_logits, labels)  # ignore_index=UNLABELED
    return torch.where((labels != UNLABELED).any(), ce, torch.zeros_like(ce))


def target_classes(labels: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """The label, or the teacher's top class where there is none: for losses whose
    teacher term itself splits on the true class (DKD)."""
    return torch.where(labels == UNLABELED, teacher_logits.argmax(1), labels)


def kd_loss(student_logits, teacher_logits, labels, T: float, alpha: float,
            t2_scale: bool = True, soft_view=None, masked: bool = True) -> torch.Tensor:
    """Hinton et al. 2015: alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE(y, s);
    with alpha = 0, CE alone (the teacher is not read). ``soft_view``, when given,
    transforms both sides' logits for the soft term only (e.g. a per-sample z-score).
    ``masked``: CE over the labelled examples only (``hard_ce``), safe on a transfer set;
    kdrun's losses pass ``masked=not self.all_labelled`` to skip the mask's cost."""
    hard = hard_ce(student_logits, labels) if masked else F.cross_entropy(student_logits, labels)
    if isinstance(alpha, (int, float)) and alpha == 0:  # (a tensor alpha: students batched)
        return hard
    if soft_view is not None:
        student_logits, teacher_logits = soft_view(student_logits), soft_view(teacher_logits)
    soft_weight = alpha * (T**2 if t2_scale else 1.0)  # one multiply a step
    return soft_weight * soft_kl(student_logits, teacher_logits, T) + (1 - alpha) * hard
