"""The classic scheme: a frozen teacher, trained first or given."""

from __future__ import annotations

from typing import TYPE_CHECKING

from omegaconf import DictConfig

from kdrun.run.schemes.base import SCHEMES, Scheme, taught_students, teacher_targets
from kdrun.run.summary_row import SummaryRow

if TYPE_CHECKING:
    from kdrun.run.stages import Stages


@SCHEMES.register("offline")
class Offline(Scheme):
    """Hinton et al. 2015: a teacher trained first (or given as a checkpoint) and frozen;
    each student seed trained from scratch and distilled."""

    all_labels_reference = True
    int8_students = True
    other_tokenizer = True
    shown = False  # the default: the header names the loss only

    def verdict_scope(self, cfg: DictConfig) -> str:
        if cfg.teacher.get("checkpoint"):
            return f"one teacher ({cfg.teacher.checkpoint})"
        return super().verdict_scope(cfg)

    def run(self, stages: Stages, cfg: DictConfig) -> list[SummaryRow]:
        teacher = stages.teacher(cfg.teacher)
        targets, columns = teacher_targets(stages, cfg, teacher)
        return [teacher.row, *taught_students(stages, cfg, targets, teacher.entry.key, columns)]
