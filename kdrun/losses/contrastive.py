"""Contrastive representation distillation (CRD), Tian, Krishnan & Isola 2020 (ICLR):
the student's embedding of an example must pick out the teacher's embedding of the same
example among many others, kept in a momentum memory bank over the training set."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.checks import PROBABILITY, number
from kdrun.losses.base import LOSSES, TEMPERATURE, WEIGHT
from kdrun.losses.feature import FeatureLoss

NCE_EPS = 1e-7  # as the reference's NCE loss


def nce_loss(scores: torch.Tensor, n_examples: int) -> torch.Tensor:
    """Noise-contrastive estimation over (batch, 1 + K) normalised scores whose column 0
    is the positive pair: -[log P(D=1 | pos) + sum over the K negatives of log P(D=0 |
    neg)], averaged over the batch, with noise probability 1 / n_examples per draw."""
    k = scores.shape[1] - 1
    noise = k / n_examples
    positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + NCE_EPS))
    negative = torch.log(noise / (scores[:, 1:] + noise + NCE_EPS))
    return -(positive.sum() + negative.sum()) / len(scores)


@LOSSES.register("crd")
class CRD(FeatureLoss):
    """CRD, Tian et al. 2020 (ICLR), "Contrastive Representation Distillation".

    Both sides' features (``student_layer``, ``teacher_layer``; the penultimate layer in
    the paper) are embedded by learned linear maps into ``feat_dim`` dimensions and
    L2-normalised. A memory bank holds, per training example, a momentum average of
    each side's embedding. Each example's student embedding is scored against the
    teacher bank's entry of the same example and ``nce_k`` entries drawn uniformly, and
    the other way round: s = exp(<v, m> / nce_t) / Z, Z fixed on the first batch
    (mean score x number of examples); each side's scores go through the NCE loss.

    L = (1 - alpha) * CE + alpha * T^2 * KD + beta * (NCE_student + NCE_teacher).
    The paper's CIFAR-100 setting: beta 0.8, feat_dim 128, nce_k 16 384, nce_t 0.07,
    momentum 0.5, alpha 0.
    """

    reads_indices = True
    config_rules = {**FeatureLoss.config_rules, "beta": WEIGHT,
                    "feat_dim": number(1, integer=True), "nce_k": number(1, integer=True),
                    "nce_t": TEMPERATURE, "momentum": PROBABILITY}

    def __init__(self, beta: float = 0.8, feat_dim: int = 128, nce_k: int = 16384,
                 nce_t: float = 0.07, momentum: float = 0.5,
                 student_layer: str = "penultimate", teacher_layer: str = "penultimate",
                 alpha: float = 0.0, T: float = 4.0):
        super().__init__(student_layer, teacher_layer, alpha, T)
        self.beta, self.feat_dim, self.nce_k = float(beta), int(feat_dim), int(nce_k)
        self.nce_t, self.momentum = float(nce_t), float(momentum)
        self._indices: torch.Tensor | None = None
        self._normalised: set[str] = set()  # sides whose normaliser Z is known

    def prepare(self, student_shape: tuple, teacher_shape: tuple) -> None:
        self.embed_student = nn.Linear(math.prod(student_shape), self.feat_dim)
        self.embed_teacher = nn.Linear(math.prod(teacher_shape), self.feat_dim)

    def set_examples(self, n: int) -> None:
        """Allocate both memory banks for ``n`` training examples, uniform in +-1 /
        sqrt(feat_dim / 3) as the reference; the normalisers are set on the first batch."""
        bound = 1.0 / math.sqrt(self.feat_dim / 3)
        weight = self.embed_student.weight  # the bank in its dtype (float64 too), drawn alike
        for side in ("student", "teacher"):
            bank = torch.rand(n, self.feat_dim, device=weight.device).to(weight.dtype)
            self.register_buffer(f"memory_{side}", bank * 2 * bound - bound)
            self.register_buffer(f"z_{side}", torch.tensor(-1.0, device=weight.device,
                                                            dtype=weight.dtype))

    def set_batch(self, indices: torch.Tensor) -> None:
        self._indices = indices

    def contrast_indices(self, indices: torch.Tensor, n: int) -> torch.Tensor:
        """(batch, 1 + nce_k): each example's own index, then nce_k uniform draws."""
        drawn = torch.randint(0, n, (len(indices), self.nce_k + 1), device=indices.device)
        drawn[:, 0] = indices
        return drawn

    def forward(self, student_logits, teacher_logits, labels, student_feature=None,
                teacher_feature=None):
        v_s = F.normalize(self.embed_student(student_feature.flatten(1)), dim=1)
        v_t = F.normalize(self.embed_teacher(teacher_feature.detach().flatten(1)), dim=1)
        n, idx = len(self.memory_student), self._indices
        contrast = self.contrast_indices(idx, n)
        # the student's embedding against the teacher's bank, and the other way round
        scores_s = self._scores("student", self.memory_teacher[contrast], v_s, n)
        scores_t = self._scores("teacher", self.memory_student[contrast], v_t, n)
        with torch.no_grad():
            self._update(self.memory_student, idx, v_s)
            self._update(self.memory_teacher, idx, v_t)
        term = nce_loss(scores_s, n) + nce_loss(scores_t, n)
        return self.base(student_logits, teacher_logits, labels) + self.beta * term

    def _scores(self, side: str, bank: torch.Tensor, v: torch.Tensor, n: int):
        scores = torch.exp(torch.bmm(bank, v.unsqueeze(2)).squeeze(2) / self.nce_t)
        z = getattr(self, f"z_{side}")
        if side not in self._normalised:  # read once per process: a resumed run has it
            if z.item() < 0:  # the first batch fixes the normaliser
                z.fill_(scores.mean().item() * n)
            self._normalised.add(side)
        return scores / z

    def _update(self, bank: torch.Tensor, idx: torch.Tensor, v: torch.Tensor) -> None:
        mixed = bank[idx] * self.momentum + v.detach() * (1 - self.momentum)
        bank[idx] = F.normalize(mixed, dim=1)
