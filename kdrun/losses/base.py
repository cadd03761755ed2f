"""What every distillation loss is and can do, declared once with explicit defaults.

A loss is called as ``loss(student_logits, teacher_logits, labels, student_feature,
teacher_feature)``. The pipeline and the trainer read the capabilities below and
never probe a loss for others. To add a loss: subclass ``DistillationLoss`` in a
module, decorate it with ``@LOSSES.register("name")``, declare ``config_rules`` for
its constructor's keys, and add ``configs/loss/<name>.yaml``; or keep the class in
your own package and name it by import path in your YAML (README: "Add your own").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kdrun.checks import Check, number
from kdrun.data.labels import UNLABELED
from kdrun.registry import Registry


class DistillationLoss(nn.Module):
    needs_teacher: ClassVar[bool] = True  # False: the teacher is never asked for
    cross_vocab: ClassVar[bool] = False  # True: teacher and student vocabularies may differ
    reads_features: ClassVar[bool] = False  # True: student_layer / teacher_layer are tapped
    reads_indices: ClassVar[bool] = False  # True: told the training set's size and each
    # batch's example indices (set_examples, set_batch), e.g. for a memory bank
    config_rules: ClassVar[dict[str, Check]] = {}  # constructor key -> its check
    student_layer: str | None = None
    teacher_layer: str | None = None
    # True: the loss is a sum of per-row terms over the vocabulary-wide rows of logits,
    # and computes them ``chunk_rows`` rows at a time when the trainer sets that
    # (trainer.loss_chunk_rows, for a language model's many positions: row_chunk_sum)
    chunks_rows: ClassVar[bool] = False
    chunk_rows: int | None = None
    # False while training on a transfer set (set by the trainer): some labels are
    # UNLABELED, and the hard-label term must be masked (hard_ce). True: plain CE.
    all_labelled: bool = True

    def hard(self, student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The hard-label cross-entropy: masked to the labelled examples (``hard_ce``)
        on a transfer set, plain ``F.cross_entropy`` (cheaper per step) otherwise; in
        chunks of rows when ``chunk_rows`` is set."""
        return hard_term(student_logits, labels, not self.all_labelled, self.chunk_rows)

    def targets(self, labels: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The true class of each example; on a transfer set, the teacher's top class
        where there is no label (``target_classes``)."""
        return labels if self.all_labelled else target_classes(labels, teacher_logits)

    def prepare(self, student_shape: tuple, teacher_shape: tuple) -> None:
        """Called once before training with the tapped features' shapes (batch excluded)."""

    def attach(self, model: nn.Module) -> None:
        """Called once with the model being trained (a mutual loss reads its cohort)."""

    def set_examples(self, labels: torch.Tensor) -> None:
        """Called once before training (and before a resume) with the label of every
        training example (UNLABELED where it has none), when ``reads_indices``."""

    def set_batch(self, indices: torch.Tensor) -> None:
        """Called before each training step with its examples' indices, when
        ``reads_indices``."""

    def start_epoch(self, epoch: int) -> None:
        """Called at the start of every training epoch (e.g. a warm-up ramp)."""

    @classmethod
    def check_config(cls, settings: dict) -> None:
        """Checks across keys, before anything trains (one key at a time: config_rules);
        raises ConfigError. A loss that takes both ways of weighting its hard-label and
        soft terms (KD_RULES) must be given exactly one."""
        if {"alpha", "ce_weight", "kd_weight"} <= cls.config_rules.keys():
            hard_soft_check(settings)

    def forward(self, student_logits, teacher_logits, labels, student_feature=None,
                teacher_feature=None) -> torch.Tensor:
        raise NotImplementedError

    def objective(self, over: Averaging) -> str:
        """The loss as it is computed, for a run's first line and summary.csv: its terms,
        their weights and temperature, and what each averages over. By default the
        class's name, settings and first docstring line; the losses whose terms kdrun
        weights itself (kd, the divergences, ce) write their terms out."""
        settings = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in vars(self).items()
                            if not k.startswith("_") and k not in DistillationLoss.__dict__
                            and k != "training" and isinstance(v, (bool, int, float, str)))
        what = (type(self).__doc__ or "").strip().splitlines()
        return (f"{type(self).__name__}({settings})"
                f"{': ' + what[0].rstrip('.') if what else ''}; mean over {over.rows}")


@dataclass(frozen=True)
class Averaging:
    """What a loss's terms average over, in words, for its ``objective``: every row of a
    batch (``rows``), the rows the hard-label term reads (``labelled``), and what a
    distribution spans (``classes``)."""

    rows: str  # e.g. "every position"
    labelled: str  # e.g. "the labelled examples (the transfer set's carry none)"
    classes: str  # e.g. "the 256 tokens"


def weighted_terms(soft: str, T: float, t2_scale: bool, weights: tuple, over: Averaging) -> str:
    """``kd_weight * T^2 * soft + ce_weight * CE`` in words, as ``kd_loss`` and the
    divergences compute it; a zero weight drops its term, as they do."""
    ce_weight, kd_weight = weights
    hard = f"CE(label, student) mean over {over.labelled}"
    if kd_weight == 0:
        return hard if ce_weight == 1 else f"{ce_weight:g} * {hard}"
    scale = f"T^2 (={T * T:g})" if t2_scale else "1 (t2_scale off)"
    text = (f"{kd_weight:g} * {scale} * {soft} at T={T:g}, summed over {over.classes}, "
            f"mean over {over.rows}")
    return text if ce_weight == 0 else f"{text} + {ce_weight:g} * {hard}"


LOSSES = Registry("loss", DistillationLoss)
TEMPERATURE = number(0, lo_open=True)
WEIGHT = number(0)  # a loss term's weight: any non-negative number
OPTIONAL_WEIGHT = number(0, optional=True)
# Hinton's KD term and the hard-label term, weighted by alpha (a convex mix) or by two
# term weights (the references' CE_WEIGHT and KD_WEIGHT): hard_soft_check says which.
KD_RULES: dict[str, Check] = {"T": TEMPERATURE, "alpha": number(0, 1, optional=True),
                              "ce_weight": OPTIONAL_WEIGHT, "kd_weight": OPTIONAL_WEIGHT}


def term_weights(alpha, ce_weight, kd_weight) -> tuple:
    """(ce_weight, kd_weight): from ``alpha``, the convex shorthand (1 - alpha, alpha),
    computed in alpha's type (a tensor when students are batched); else as given."""
    return (1 - alpha, alpha) if alpha is not None else (ce_weight, kd_weight)


def optional_floats(*values) -> tuple:
    """Each value as a float, None kept (a term weight that is not set)."""
    return tuple(None if v is None else float(v) for v in values)


def hard_soft_check(settings: dict) -> None:
    """alpha, or ce_weight and kd_weight: exactly one of the two ways to weight the
    hard-label and KD terms (a ConfigError naming the key otherwise)."""
    from kdrun.errors import ConfigError

    alpha = settings.get("alpha")
    weights = {k: settings.get(k) for k in ("ce_weight", "kd_weight")}
    given = [k for k, v in weights.items() if v is not None]
    if alpha is not None and given:
        raise ConfigError(f"loss.{given[0]}", weights[given[0]],
                          f"loss.alpha={alpha} already weights the terms; set loss.alpha=null "
                          "to weight them by loss.ce_weight and loss.kd_weight, or leave "
                          "those null")
    if alpha is None and len(given) < 2:
        missing = next(k for k in weights if k not in given)
        raise ConfigError(f"loss.{missing}", None,
                          "with loss.alpha=null, set both loss.ce_weight and loss.kd_weight "
                          "(or set loss.alpha, in [0, 1])")


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float,
            chunk_rows: int | None = None) -> torch.Tensor:
    """KL(p_t^T || p_s^T), summed over classes and averaged over the batch ("batchmean");
    ``chunk_rows`` rows at a time when given (``row_chunk_sum``).

    Both sides are given as log-probabilities (``log_target=True``): no softmax is
    taken twice, and the teacher side cannot underflow to log(0).
    """
    def kl_sum(s, t):
        log_p_student = F.log_softmax(s / T, dim=1)
        log_p_teacher = F.log_softmax(t.detach() / T, dim=1)
        # F.kl_div(..., "sum", log_target=True) written out: torch.func.vmap has no
        # batching rule for kl_div, and batched students (kdrun/train/stacked.py) call this
        return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum()

    return row_chunk_sum(kl_sum, chunk_rows, student_logits, teacher_logits) / len(student_logits)


def row_chunk_sum(sum_fn, chunk_rows: int | None, *rows: torch.Tensor) -> torch.Tensor:
    """``sum_fn(*rows)``, a sum of per-row terms, computed ``chunk_rows`` rows at a time
    when there are more: each chunk's intermediates (a language model's softmaxes over
    its vocabulary, several tensors of rows x vocabulary) are recomputed in the backward
    pass instead of kept (activation checkpointing), so the loss's memory holds one
    chunk's. The same sum up to rounding; null chunk_rows: all rows at once."""
    n = len(rows[0])
    if not chunk_rows or n <= chunk_rows:
        return sum_fn(*rows)
    parts = [checkpoint(sum_fn, *(r[i:i + chunk_rows] for r in rows), use_reentrant=False)
             for i in range(0, n, chunk_rows)]
    return torch.stack(parts).sum()


def row_chunk_mean(mean_fn, chunk_rows: int | None, *rows: torch.Tensor) -> torch.Tensor:
    """``mean_fn(*rows)``, a mean of per-row terms, as ``row_chunk_sum`` computes a sum:
    each chunk's mean weighted by its rows."""
    n = len(rows[0])
    if not chunk_rows or n <= chunk_rows:
        return mean_fn(*rows)
    return row_chunk_sum(lambda *part: mean_fn(*part) * len(part[0]), chunk_rows, *rows) / n


def chunked_hard_ce(student_logits: torch.Tensor, labels: torch.Tensor,
                    chunk_rows: int) -> torch.Tensor:
    """``hard_ce`` computed ``chunk_rows`` rows at a time: the cross-entropy summed per
    chunk, over the labelled rows of the whole batch (0 for a batch without any)."""
    total = row_chunk_sum(lambda s, y: F.cross_entropy(s, y, reduction="sum"), chunk_rows,
                          student_logits, labels)
    labelled = (labels != UNLABELED).sum()
    return torch.where(labelled > 0, total / labelled.clamp_min(1), torch.zeros_like(total))


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


def hard_term(student_logits: torch.Tensor, labels: torch.Tensor, masked: bool,
              chunk_rows: int | None = None) -> torch.Tensor:
    """The hard-label cross-entropy: in chunks of rows when ``chunk_rows`` is set, masked
    to the labelled examples (``hard_ce``) when ``masked``, else plain ``F.cross_entropy``
    (cheaper per step)."""
    if chunk_rows:
        return chunked_hard_ce(student_logits, labels, chunk_rows)
    return hard_ce(student_logits, labels) if masked else F.cross_entropy(student_logits, labels)


def target_classes(labels: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """The label, or the teacher's top class where there is none: for losses whose
    teacher term itself splits on the true class (DKD)."""
    return torch.where(labels == UNLABELED, teacher_logits.argmax(1), labels)


def kd_loss(student_logits, teacher_logits, labels, T: float, alpha: float | None,
            t2_scale: bool = True, soft_view=None, masked: bool = True,
            ce_weight: float | None = None, kd_weight: float | None = None,
            chunk_rows: int | None = None) -> torch.Tensor:
    """Hinton et al. 2015: kd_weight * T^2 * KL(p_t^T || p_s^T) + ce_weight * CE(y, s).

    ``alpha`` is the convex shorthand, kd_weight = alpha and ce_weight = 1 - alpha; with
    ``alpha=None`` the two term weights are given as such (e.g. logit standardisation's
    CE 0.1 + KD 9). A KD weight of 0 gives CE alone (the teacher is not read).
    ``soft_view``, when given, transforms both sides' logits for the soft term only
    (e.g. a per-sample z-score). ``masked``: CE over the labelled examples only
    (``hard_ce``), safe on a transfer set; kdrun's losses pass ``masked=not
    self.all_labelled`` to skip the mask's cost. ``chunk_rows``: both terms computed that
    many rows at a time (``row_chunk_sum``)."""
    ce_weight, kd_weight = term_weights(alpha, ce_weight, kd_weight)
    hard = hard_term(student_logits, labels, masked, chunk_rows)
    if isinstance(kd_weight, (int, float)) and kd_weight == 0:  # (a tensor: students batched)
        return hard if ce_weight == 1 else ce_weight * hard
    if soft_view is not None:
        student_logits, teacher_logits = soft_view(student_logits), soft_view(teacher_logits)
    soft_weight = kd_weight * (T**2 if t2_scale else 1.0)  # one multiply a step
    return soft_weight * soft_kl(student_logits, teacher_logits, T, chunk_rows) + ce_weight * hard
