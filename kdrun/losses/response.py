"""Response-based distillation beyond Hinton's KD: methods that read only logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.checks import PROBABILITY, boolean, number
from kdrun.losses.base import (
    LOSSES,
    TEMPERATURE,
    WEIGHT,
    DistillationLoss,
    zscore,
)


@LOSSES.register("mse_logits")
class MSELogits(DistillationLoss):
    """Logit matching, Ba & Caruana 2014, "Do Deep Nets Really Need to be Deep?":
    the student regresses the teacher's logits.

    L = (1 - beta) * CE + beta * MSE(s, t), the MSE averaged over batch and classes.
    """

    config_rules = {"beta": PROBABILITY}  # beta > 1 would give CE a negative weight

    def __init__(self, beta: float = 0.9):
        super().__init__()
        self.beta = float(beta)

    def forward(self, student_logits, teacher_logits, labels, student_feature=None,
                teacher_feature=None):
        hard = self.hard(student_logits, labels)
        return (1 - self.beta) * hard + self.beta * F.mse_loss(student_logits,
                                                               teacher_logits.detach())


def dkd_parts(student_logits, teacher_logits, targets, T: float):
    """Per-sample (TCKD, NCKD, teacher's target-class probability), Zhao et al. 2022.

    TCKD: KL between the binary (target, all others) distributions of teacher and
    student. NCKD: KL between their distributions over the non-target classes only.
    Hinton's soft KL per sample equals TCKD + (1 - p_t[target]) * NCKD (the paper's eq. 7).
    """
    target = F.one_hot(targets, student_logits.shape[1]).bool()

    def pieces(logits):
        logits = logits / T
        log_all = torch.logsumexp(logits, 1)
        log_gt = logits[target] - log_all  # log p[target]
        log_rest = torch.logsumexp(logits.masked_fill(target, float("-inf")), 1) - log_all
        log_binary = torch.stack([log_gt, log_rest], 1)
        log_non_target = F.log_softmax(logits.masked_fill(target, float("-inf")), 1)
        return log_binary, log_non_target.masked_fill(target, 0.0)  # no -inf - -inf = nan

    log_bs, log_qs = pieces(student_logits)
    log_bt, log_qt = pieces(teacher_logits.detach())
    tckd = (log_bt.exp() * (log_bt - log_bs)).sum(1)
    q_t = log_qt.exp().masked_fill(target, 0.0)
    nckd = (q_t * (log_qt - log_qs)).sum(1)
    return tckd, nckd, log_bt[:, 0].exp()


@LOSSES.register("dkd")
class DKD(DistillationLoss):
    """Decoupled knowledge distillation, Zhao et al. 2022 (CVPR), "Decoupled Knowledge
    Distillation": KD split into a target-class term (TCKD) and a non-target term
    (NCKD), weighted separately.

    L = CE + min(epoch / warmup, 1) * T^2 * (dkd_alpha * TCKD + dkd_beta * NCKD),
    both KLs averaged over the batch. Paper (CIFAR-100): dkd_alpha=1, dkd_beta=8, T=4,
    a 20-epoch warm-up of 240 epochs. ``logit_std`` z-scores both sides' logits per
    sample before the temperature softmax of the DKD terms (Sun et al. 2024, CVPR).
    """

    config_rules = {"dkd_alpha": WEIGHT, "dkd_beta": WEIGHT, "T": TEMPERATURE,
                    "warmup": number(0, integer=True), "logit_std": boolean}

    def __init__(self, dkd_alpha: float = 1.0, dkd_beta: float = 8.0, T: float = 4.0,
                 warmup: int = 0, logit_std: bool = False):
        super().__init__()
        self.dkd_alpha, self.dkd_beta, self.T = float(dkd_alpha), float(dkd_beta), float(T)
        self.warmup, self.logit_std = warmup, bool(logit_std)
        self.ramp = 1.0

    def start_epoch(self, epoch: int) -> None:
        self.ramp = min(epoch / self.warmup, 1.0) if self.warmup else 1.0

    def forward(self, student_logits, teacher_logits, labels, student_feature=None,
                teacher_feature=None):
        soft_s, soft_t = ((zscore(student_logits), zscore(teacher_logits)) if self.logit_std
                          else (student_logits, teacher_logits))
        # an unlabelled (transfer-set) example splits on the teacher's top class
        tckd, nckd, _ = dkd_parts(soft_s, soft_t, self.targets(labels, teacher_logits), self.T)
        term = self.dkd_alpha * tckd.mean() + self.dkd_beta * nckd.mean()
        return self.hard(student_logits, labels) + self.ramp * self.T**2 * term


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b."""
    return F.cosine_similarity(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True),
                               dim=1, eps=eps)


@LOSSES.register("dist")
class DIST(DistillationLoss):
    """Knowledge distillation from a stronger teacher, Huang et al. 2022 (NeurIPS),
    "DIST": match the *relations* of predictions rather than their values.

    inter = mean over samples of 1 - pearson(p_s[i, :], p_t[i, :]) (across classes);
    intra = mean over classes of 1 - pearson(p_s[:, c], p_t[:, c]) (across the batch);
    L = CE + T^2 * (beta * inter + gamma * intra), p = softmax(logits / T).
    The paper's CIFAR-100 setting: beta = gamma = 2, T = 4.
    """

    config_rules = {"beta": WEIGHT, "gamma": WEIGHT, "T": TEMPERATURE}

    def __init__(self, beta: float = 2.0, gamma: float = 2.0, T: float = 4.0):
        super().__init__()
        self.beta, self.gamma, self.T = float(beta), float(gamma), float(T)

    def forward(self, student_logits, teacher_logits, labels, student_feature=None,
                teacher_feature=None):
        p_s = F.softmax(student_logits / self.T, 1)
        p_t = F.softmax(teacher_logits.detach() / self.T, 1)
        inter = 1 - pearson_rows(p_s, p_t).mean()
        intra = 1 - pearson_rows(p_s.T, p_t.T).mean()
        term = self.beta * inter + self.gamma * intra
        return self.hard(student_logits, labels) + self.T**2 * term
