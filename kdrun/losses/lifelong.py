"""The loss of one task of a sequence (scheme=lifelong): cross-entropy on the task's
labels among the classes a prediction may choose from, and, for Learning without
Forgetting, a distillation loss on the outputs of the earlier tasks, the learner's
previous copy as the teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.data.labels import UNLABELED
from kdrun.losses.base import Averaging, DistillationLoss


class TaskLoss(DistillationLoss):
    """Li & Hoiem 2016, "Learning without Forgetting" (ECCV), with any logit loss as the
    old-output term:

    L = ce_weight * CE(y, s restricted to the choices of y) + mean over old groups g of
        keep(s[:, g], t[:, g])

    ``allowed[y]`` (classes x classes, bool) holds what a prediction for class y may
    choose from (kdrun/data/tasks.py); ``keep`` is the loss group's loss, given no label
    (its hard-label term is empty), so only its teacher term acts: on each earlier task's
    outputs (``old_groups``), softmax over that group. No old groups: fine-tuning or joint
    training, CE alone."""

    def __init__(self, allowed: torch.Tensor, old_groups: list[list[int]] = (),
                 keep: DistillationLoss | None = None, ce_weight: float = 1.0):
        super().__init__()
        self.register_buffer("allowed", allowed, persistent=False)
        self.old_groups = [list(g) for g in old_groups]
        self.keep, self.ce_weight = keep, float(ce_weight)
        self.needs_teacher = bool(self.old_groups)

    def forward(self, student_logits, teacher_logits, labels, student_feature=None,
                teacher_feature=None) -> torch.Tensor:
        choices = self.allowed[labels]
        hard = F.cross_entropy(student_logits.masked_fill(~choices, float("-inf")), labels)
        if not self.old_groups:
            return hard
        self.keep.all_labelled = False  # every row unlabelled for it: its teacher term alone
        unlabelled = torch.full_like(labels, UNLABELED)
        kept = torch.stack([self.keep(student_logits[:, g], teacher_logits[:, g], unlabelled)
                            for g in self.old_groups]).mean()
        return self.ce_weight * hard + kept

    def objective(self, over: Averaging) -> str:
        hard = f"CE(label, student over the label's choices) mean over {over.rows}"
        if not self.old_groups:
            return hard
        kept = self.keep.objective(Averaging(over.rows, "no row (old outputs carry no label)",
                                             "an earlier task's classes"))
        return (f"{self.ce_weight:g} * {hard} + mean over the earlier tasks' output groups "
                f"(a task's classes; class incremental: every earlier class) of [{kept}]")
