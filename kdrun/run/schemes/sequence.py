"""Sequence-level distillation for language models: the teacher writes text, and the
student learns from it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig

from kdrun.checks import number
from kdrun.data import Split
from kdrun.data.labels import UNLABELED
from kdrun.losses.base import TEMPERATURE
from kdrun.run.provenance import seed_stream
from kdrun.run.schemes.base import (
    SCHEMES,
    Scheme,
    check_text_windows,
    taught_students,
    teacher_targets,
)
from kdrun.run.summary_row import SummaryRow
from kdrun.train.generate import continue_text, respond

if TYPE_CHECKING:
    from kdrun.run.stages import Stages


@SCHEMES.register("sequence_kd")
class SequenceKD(Scheme):
    """Sequence-level KD, Kim & Rush 2016 (EMNLP), as GKD's off-policy "teacher-generated"
    data: the trained teacher continues the first ``prompt`` tokens of ``samples``
    training windows, sampling each next token at ``temperature``, to full windows. Those
    windows join the distilled student's transfer set (no labels: it learns the
    teacher's token distributions on them, with the loss's soft term); the scratch
    student never sees them. On instruction data each sampled window's own prompt is
    answered, and only the answer is learned. The draws come from a generator of their
    own, so the text, and with it the distilled stage's key, is the same on every run."""

    config_rules = {"samples": number(1, integer=True), "prompt": number(1, integer=True),
                    "temperature": TEMPERATURE}
    batchable = False  # its transfer set exists only once the teacher is trained
    unlabelled_rows = "the teacher's continuations"

    def __init__(self, samples: int = 1000, prompt: int = 8, temperature: float = 1.0):
        self.samples, self.prompt, self.temperature = int(samples), int(prompt), float(
            temperature)

    def check_data(self, cfg: DictConfig, data) -> None:
        check_text_windows(data, "sequence_kd", self.prompt)

    def run(self, stages: Stages, cfg: DictConfig) -> list[SummaryRow]:
        teacher = stages.teacher(cfg.teacher)
        stages.add_transfer(self.write(teacher.model, stages.data, stages.device, cfg.seed))
        targets, columns = teacher_targets(stages, cfg, teacher)
        return [teacher.row, *taught_students(stages, cfg, targets, teacher.entry.key, columns)]

    def write(self, teacher, data, device, seed: int) -> Split:
        """(samples, positions) token windows without labels: prompts from training
        windows, continued by the teacher one sampled token at a time (instruction data:
        each window's own prompt, answered up to its end token; only the answer is
        learned)."""
        draw = torch.Generator().manual_seed(seed_stream("sequence_kd", seed))
        train = data.train
        rows = torch.randint(0, len(train), (self.samples,), generator=draw)
        teacher = teacher.to(device)
        if data.end_token is not None:
            x, labels = respond(teacher, train.x[rows].to(device), train.y[rows].to(device),
                                data.end_token, self.temperature, draw)
            return Split(x.cpu(), labels.cpu())
        prompts = train.x[rows, : self.prompt].to(device)
        written = continue_text(teacher, prompts, train.x.shape[1], self.temperature,
                                draw).cpu()
        return Split(written, torch.full_like(written, UNLABELED))
