"""Online distillation: students that teach each other while they train."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from kdrun.losses.base import DistillationLoss, soft_kl
from kdrun.precision import widen


class DML(DistillationLoss):
    """Deep mutual learning, Zhang et al. 2018 (CVPR): a cohort of K students, no
    pre-trained teacher; each learns the labels and its peers' predictions.

    L = sum_i [ CE(y, z_i) + T^2 / (K-1) * sum_{j != i} KL(p_j^T || p_i^T) ],
    each peer's distribution detached, so member i's gradient comes only from its own
    term; the members are updated together (the paper alternates). T=1 in the paper.
    """

    needs_teacher = False

    def __init__(self, T: float = 1.0):
        super().__init__()
        self.T = float(T)
        self._cohort: list = []  # a plain list: the cohort is the model, not a part of the loss

    def attach(self, cohort: nn.Module) -> None:
        self._cohort = [cohort]

    def forward(self, student_logits, teacher_logits, labels, student_feature=None,
                teacher_feature=None):
        outputs = self._cohort[0].outputs
        k = len(outputs)
        total = 0.0
        for i, z in enumerate(outputs):
            peers = sum(soft_kl(z, outputs[j], self.T) for j in range(k) if j != i)
            total = total + F.cross_entropy(widen(z), labels) + self.T**2 * peers / (k - 1)
        return total
