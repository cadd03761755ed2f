"""Divergences between the teacher's and the student's softened distributions beyond
Hinton's forward KL, as language-model distillation uses them token by token (each row
of logits is one position: kdrun/train/tokens.py), and as any classifier can:

- ``reverse_kl``: KL(p_s || p_t), mode-seeking (MiniLLM, Gu et al. 2024);
- ``jsd``: the generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024), with
  TRL's convention: beta = 0 is the forward KL(p_t || p_s), beta = 1 the reverse KL;
- ``skew_kl``: DistiLLM's skew KL (Ko et al. 2024), KL(p_t || a p_t + (1 - a) p_s), or
  its reverse KL(p_s || a p_s + (1 - a) p_t);
- ``tv``: the total variation distance, half the L1 distance of the distributions;
- ``uld``: Universal Logit Distillation's sorted-probability distance (Boizard et al.
  2024), for a teacher and a student with different tokenizers.

Each is L = kd_weight * T^2 * D + ce_weight * CE, weighted by ``alpha`` (kd_weight =
alpha, ce_weight = 1 - alpha) or by the two term weights, as ``kd``; p = softmax(z / T);
every divergence summed over the vocabulary and averaged over the rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.checks import PROBABILITY, boolean
from kdrun.losses.base import (
    KD_RULES,
    LOSSES,
    Averaging,
    DistillationLoss,
    optional_floats,
    row_chunk_mean,
    term_weights,
    weighted_terms,
)


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) from log-probabilities, summed over the last dimension and averaged over
    the rows (0 log 0 = 0)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1).mean(-1)


def log_mix(log_p: torch.Tensor, log_q: torch.Tensor, weight) -> torch.Tensor:
    """log(weight * p + (1 - weight) * q), computed in log space; weight in (0, 1) (a
    number, or a tensor when students are batched)."""
    w = torch.as_tensor(weight, dtype=log_p.dtype, device=log_p.device)
    return torch.logaddexp(log_p + torch.log(w), log_q + torch.log1p(-w))


def jsd(log_s, log_t, beta):
    """TRL's GKD convention: beta 0 = KL(p_t || p_s), 1 = KL(p_s || p_t), between them
    beta * KL(p_t || m) + (1 - beta) * KL(p_s || m), m = beta p_t + (1 - beta) p_s."""
    if beta == 0:
        return kl_rows(log_t, log_s)
    if beta == 1:
        return kl_rows(log_s, log_t)
    log_m = log_mix(log_t, log_s, beta)
    return beta * kl_rows(log_t, log_m) + (1 - beta) * kl_rows(log_s, log_m)


def skew_kl(log_s, log_t, skew, reverse: bool):
    """DistiLLM: KL(p_t || skew p_t + (1 - skew) p_s); reversed, KL(p_s || skew p_s +
    (1 - skew) p_t). skew = 0 is the plain (forward or reverse) KL."""
    first, second = (log_s, log_t) if reverse else (log_t, log_s)
    if skew == 0:
        return kl_rows(first, second)
    return kl_rows(first, log_mix(first, second, skew))


class Divergence(DistillationLoss):
    """kd_weight * T^2 * divergence(p_s, p_t) + ce_weight * CE (see the module's doc);
    a subclass says which divergence in ``term``."""

    config_rules = {**KD_RULES, "t2_scale": boolean}
    chunks_rows = True

    def __init__(self, T: float = 1.0, alpha: float | None = 0.5, t2_scale: bool = True,
                 ce_weight: float | None = None, kd_weight: float | None = None):
        super().__init__()
        self.T, self.t2_scale = float(T), bool(t2_scale)
        self.alpha, self.ce_weight, self.kd_weight = optional_floats(alpha, ce_weight, kd_weight)

    def term(self, log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, student_logits, teacher_logits, labels, student_feature=None,
                teacher_feature=None):
        ce_weight, kd_weight = term_weights(self.alpha, self.ce_weight, self.kd_weight)

        def soft_term(s, t):  # the divergence at T, averaged over the rows
            return self.term(F.log_softmax(s / self.T, -1), F.log_softmax(t.detach() / self.T, -1))

        soft = row_chunk_mean(soft_term, self.chunk_rows, student_logits, teacher_logits)
        scale = self.T**2 if self.t2_scale else 1.0
        return kd_weight * scale * soft + ce_weight * self.hard(student_logits, labels)

    def formula(self) -> str:
        """The divergence in words, p_t the teacher's distribution and p_s the student's."""
        raise NotImplementedError

    def objective(self, over: Averaging) -> str:
        return weighted_terms(self.formula(), self.T, self.t2_scale,
                              term_weights(self.alpha, self.ce_weight, self.kd_weight), over)


@LOSSES.register("reverse_kl")
class ReverseKL(Divergence):
    """Reverse KL, KL(p_s || p_t): the student puts its mass where the teacher's is, and
    need not cover all of it (MiniLLM, Gu et al. 2024, ICLR)."""

    def term(self, log_s, log_t):
        return kl_rows(log_s, log_t)

    def formula(self) -> str:
        return "KL(p_s || p_t)"


@LOSSES.register("jsd")
class JSD(Divergence):
    """The generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, ICLR), TRL's
    convention: ``beta`` 0 = forward KL(p_t || p_s), 1 = reverse KL(p_s || p_t)."""

    config_rules = {**Divergence.config_rules, "beta": PROBABILITY}

    def __init__(self, beta: float = 0.5, T: float = 1.0, alpha: float | None = 0.5,
                 t2_scale: bool = True, ce_weight: float | None = None,
                 kd_weight: float | None = None):
        super().__init__(T, alpha, t2_scale, ce_weight, kd_weight)
        self.beta = float(beta)

    def term(self, log_s, log_t):
        return jsd(log_s, log_t, self.beta)

    def formula(self) -> str:
        if self.beta in (0, 1):
            return f"JSD(beta={self.beta:g}) = " + ("KL(p_t || p_s)" if self.beta == 0 else
                                                   "KL(p_s || p_t)")
        b, rest = f"{self.beta:g}", f"{1 - self.beta:g}"
        return (f"JSD(beta={b}) = {b} * KL(p_t || m) + {rest} * KL(p_s || m), "
                f"m = {b} p_t + {rest} p_s")


@LOSSES.register("skew_kl")
class SkewKL(Divergence):
    """DistiLLM's skew KL (Ko et al. 2024, ICML): the student's distribution mixed with a
    ``skew`` share of the teacher's keeps the divergence finite and its gradients tame;
    ``reverse`` gives the skew reverse KL."""

    config_rules = {**Divergence.config_rules, "skew": PROBABILITY, "reverse": boolean}

    def __init__(self, skew: float = 0.1, reverse: bool = False, T: float = 1.0,
                 alpha: float | None = 0.5, t2_scale: bool = True,
                 ce_weight: float | None = None, kd_weight: float | None = None):
        super().__init__(T, alpha, t2_scale, ce_weight, kd_weight)
        self.skew, self.reverse = float(skew), bool(reverse)

    def term(self, log_s, log_t):
        return skew_kl(log_s, log_t, self.skew, self.reverse)

    def formula(self) -> str:
        first, second = ("p_s", "p_t") if self.reverse else ("p_t", "p_s")
        if self.skew == 0:
            return f"KL({first} || {second})"
        return f"KL({first} || {self.skew:g} {first} + {1 - self.skew:g} {second})"


@LOSSES.register("tv")
class TotalVariation(Divergence):
    """Total variation distance, 0.5 * sum |p_t - p_s|: bounded in [0, 1] (Wen et al.
    2023, "f-Divergence Minimization for Sequence-Level KD")."""

    def term(self, log_s, log_t):
        return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1).mean(-1)

    def formula(self) -> str:
        return "TV(p_t, p_s) = 0.5 * sum |p_t - p_s|"


def sorted_l1(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    """Universal Logit Distillation's distance (Boizard et al. 2024): each row's
    probabilities sorted from the largest, the shorter vocabulary padded with zeros, and
    the absolute differences summed (the Wasserstein-1 distance between the two sorted
    distributions under their closed form), averaged over the rows. It reads no token's
    identity, so teacher and student may have different vocabularies."""
    p_s = log_s.exp().sort(-1, descending=True).values
    p_t = log_t.exp().sort(-1, descending=True).values
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s = F.pad(p_s, (0, width - p_s.shape[-1]))
    p_t = F.pad(p_t, (0, width - p_t.shape[-1]))
    return (p_s - p_t).abs().sum(-1).mean(-1)


@LOSSES.register("uld")
class ULD(Divergence):
    """Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer
    Distillation"): the sorted-probability distance between the teacher's and the
    student's next-token distributions, position by position, with the hard CE: for a
    teacher and a student with different tokenizers (``dataset.teacher_tokenizer``)."""

    cross_vocab = True

    def term(self, log_s, log_t):
        return sorted_l1(log_s, log_t)

    def formula(self) -> str:
        return ("ULD = sum_k |sort(p_s)_k - sort(p_t)_k| (each sorted from the largest, the "
                "shorter vocabulary padded with 0)")
