"""On-policy distillation for language models: the student also learns on its own text."""

from __future__ import annotations

from typing import TYPE_CHECKING

from omegaconf import DictConfig

from kdrun.checks import PROBABILITY, number
from kdrun.errors import ConfigError
from kdrun.losses import build_loss
from kdrun.losses.base import TEMPERATURE
from kdrun.run.schemes.base import SCHEMES, Scheme, check_text_windows, taught_students
from kdrun.run.summary_row import SummaryRow
from kdrun.train.fit import configure_device
from kdrun.train.on_policy import OnPolicyTeacher

if TYPE_CHECKING:
    from kdrun.run.stages import Stages


@SCHEMES.register("on_policy")
class OnPolicy(Scheme):
    """GKD's on-policy fraction (Agarwal et al. 2024): the distilled student trains on
    its own sampled text in a ``fraction`` of its batches, scored by the teacher run on
    every batch (kdrun/train/on_policy.py); 0 is off-policy KD with a live teacher, 1
    the student's text only. The scratch student trains as in every scheme."""

    config_rules = {"fraction": PROBABILITY, "prompt": number(1, integer=True),
                    "temperature": TEMPERATURE}
    batchable = False  # each batch depends on the student as it is
    unlabelled_rows = "the student's own text"
    caches_teacher_logits = False  # the teacher scores every batch live

    def __init__(self, fraction: float = 0.5, prompt: int = 8, temperature: float = 1.0):
        self.fraction, self.prompt = float(fraction), int(prompt)
        self.temperature = float(temperature)

    def check_data(self, cfg: DictConfig, data) -> None:
        check_text_windows(data, "on_policy", self.prompt)

    def run(self, stages: Stages, cfg: DictConfig) -> list[SummaryRow]:
        loss = build_loss(cfg.loss)
        if not loss.needs_teacher:
            raise ConfigError("loss.name", cfg.loss.name, "on-policy distillation needs a "
                              "loss that reads the teacher")
        teacher = stages.teacher(cfg.teacher)
        targets = OnPolicyTeacher(teacher.model, configure_device(stages.tcfg, stages.device),
                                  self.fraction, self.prompt, self.temperature,
                                  loss.teacher_layer if loss.reads_features else None,
                                  end_token=stages.data.end_token)
        return [teacher.row, *taught_students(stages, cfg, targets, teacher.entry.key, {})]
