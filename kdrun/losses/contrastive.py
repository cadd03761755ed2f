"""Contrastive representation distillation (CRD), Tian, Krishnan & Isola 2020 (ICLR):
the student's embedding of an example must pick out the teacher's embedding of the same
example among many others, kept in a momentum memory bank over the training set."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.checks import PROBABILITY, number, one_of
from kdrun.data.labels import UNLABELED
from kdrun.errors import ConfigError
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


def other_class_draws(labels: torch.Tensor, anchors: torch.Tensor, k: int) -> torch.Tensor:
    """(len(anchors), k) indices of examples that are neither the anchor nor of its class
    (an UNLABELED anchor or example is of no class), each row drawn uniformly: without
    replacement where the anchor has at least k such examples (the top k of random
    keys), with replacement where it has fewer (RepDistiller's np.random.choice rule)."""
    n = len(labels)
    own = labels[anchors]
    excluded = (labels[None, :] == own[:, None]) & (own[:, None] != UNLABELED)
    excluded[torch.arange(len(anchors), device=anchors.device), anchors] = True
    keys = torch.rand(len(anchors), n, device=labels.device).masked_fill_(excluded, -1.0)
    enough = (n - excluded.sum(1)) >= k
    if k <= n:
        distinct = keys.topk(k, dim=1).indices  # the allowed ones rank first
        if bool(enough.all()):
            return distinct
    # an anchor with fewer than k allowed examples: k draws among them, with replacement
    draws = torch.multinomial((~excluded).to(keys.dtype), k, replacement=True)
    return draws if k > n else torch.where(enough[:, None], distinct, draws)


@LOSSES.register("crd")
class CRD(FeatureLoss):
    """CRD, Tian et al. 2020 (ICLR), "Contrastive Representation Distillation".

    Both sides' features (``student_layer``, ``teacher_layer``; the penultimate layer in
    the paper) are embedded by learned linear maps into ``feat_dim`` dimensions and
    L2-normalised. A memory bank holds, per training example, a momentum average of
    each side's embedding. Each example's student embedding is scored against the
    teacher bank's entry of the same example and ``nce_k`` negatives, and the other way
    round. ``negatives=other_classes`` (the references' "exact" mode: RepDistiller's and
    mdistiller's ``dataset/cifar100.py``) draws them among the examples of the other
    classes, without replacement where there are enough (with, where there are not, as
    they do); an example without a label (a transfer set) is of no class: any other
    example may be its negative. ``uniform`` draws them over all examples, with
    replacement (its own and same-class examples included). Scores: s = exp(<v, m> /
    nce_t) / Z, Z fixed on the first batch (mean score x number of examples); each
    side's scores go through the NCE loss.

    L = (1 - alpha) * CE + alpha * T^2 * KD + beta * (NCE_student + NCE_teacher).
    The paper's CIFAR-100 setting: beta 0.8, feat_dim 128, nce_k 16 384, nce_t 0.07,
    momentum 0.5, alpha 0.
    """

    reads_indices = True
    config_rules = {**FeatureLoss.config_rules, "beta": WEIGHT,
                    "feat_dim": number(1, integer=True), "nce_k": number(1, integer=True),
                    "nce_t": TEMPERATURE, "momentum": PROBABILITY,
                    "negatives": one_of("other_classes", "uniform")}

    def __init__(self, beta: float = 0.8, feat_dim: int = 128, nce_k: int = 16384,
                 nce_t: float = 0.07, momentum: float = 0.5,
                 student_layer: str = "penultimate", teacher_layer: str = "penultimate",
                 alpha: float | None = 0.0, T: float = 4.0,
                 ce_weight: float | None = None, kd_weight: float | None = None,
                 negatives: str = "other_classes"):
        super().__init__(student_layer, teacher_layer, alpha, T, ce_weight, kd_weight)
        self.beta, self.feat_dim, self.nce_k = float(beta), int(feat_dim), int(nce_k)
        self.nce_t, self.momentum, self.negatives = float(nce_t), float(momentum), negatives
        self._labels: torch.Tensor | None = None
        self._indices: torch.Tensor | None = None
        self._normalised: set[str] = set()  # sides whose normaliser Z is known

    def prepare(self, student_shape: tuple, teacher_shape: tuple) -> None:
        self.embed_student = nn.Linear(math.prod(student_shape), self.feat_dim)
        self.embed_teacher = nn.Linear(math.prod(teacher_shape), self.feat_dim)

    def set_examples(self, labels: torch.Tensor) -> None:
        """Allocate both memory banks for the training examples, uniform in +-1 /
        sqrt(feat_dim / 3) as the reference; the normalisers are set on the first batch.
        ``labels`` (UNLABELED where none) decide which examples are another's negatives."""
        n, self._labels = len(labels), labels
        known = labels[labels != UNLABELED]
        one_class = len(known) == n and bool((known == known[0]).all())
        if self.negatives == "other_classes" and one_class:
            raise ConfigError("loss.negatives", self.negatives, "every training example is of "
                              "one class, so none has a negative of another: use uniform")
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
        """(batch, 1 + nce_k): each example's own index, then its nce_k negatives."""
        if self.negatives == "uniform":
            drawn = torch.randint(0, n, (len(indices), self.nce_k + 1), device=indices.device)
            drawn[:, 0] = indices
            return drawn
        return torch.cat([indices[:, None], other_class_draws(self._labels, indices,
                                                               self.nce_k)], 1)

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
