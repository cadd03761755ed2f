"""On-policy distillation (GKD): the student trains partly on its own text, which the
teacher scores as the student writes it."""

from __future__ import annotations

import torch
from torch import nn

from kdrun.data.labels import UNLABELED
from kdrun.train.generate import continue_text, respond
from kdrun.train.targets import LiveTeacher


class OnPolicyTeacher(LiveTeacher):
    """Generalised KD's on-policy data, Agarwal et al. 2024 (ICLR), "On-Policy
    Distillation of Language Models": with probability ``fraction`` (GKD's lambda) a
    training batch is replaced by the student's own text, each window's first
    ``prompt`` tokens continued by the student as it is at that step, sampled at
    ``temperature`` (instruction data: each window's own prompt, answered up to its end
    token, learned on the answer only); the teacher, run on every batch, gives its token
    distributions on whichever text the student trains on. The student's windows carry
    no labels: on them it learns from the loss's soft term alone, at every position. The
    draws come
    from the stage's augmentation generator, saved with its state: a resumed stage
    writes the same text."""

    rewrites = True

    def __init__(self, model: nn.Module, autocast, fraction: float, prompt: int,
                 temperature: float, layer: str | None = None, end_token: int | None = None):
        super().__init__(model, autocast, layer)
        self.fraction, self.prompt, self.temperature = fraction, prompt, temperature
        self.end_token = end_token  # instruction data: each window's own prompt, answered

    @property
    def stage_key(self) -> dict:
        """What a distilled stage's key holds about these targets besides the teacher."""
        return {"on_policy": {"fraction": self.fraction, "prompt": self.prompt,
                              "temperature": self.temperature}}

    def rewrite(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch to train on: (x, y) as given, or the student's text without labels."""
        if torch.rand((), generator=generator).item() >= self.fraction:
            return x, y
        if self.end_token is not None:  # the student answers each window's prompt
            return respond(student, x, y, self.end_token, self.temperature, generator)
        text = continue_text(student, x[:, : self.prompt], x.shape[1], self.temperature,
                             generator)
        return text, torch.full_like(y, UNLABELED)
