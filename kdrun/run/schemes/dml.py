"""Deep mutual learning: a cohort of students teaching each other, no teacher."""

from __future__ import annotations

from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from kdrun.checks import number
from kdrun.losses import CE, DML
from kdrun.run.schemes.base import SCHEMES, Scheme
from kdrun.run.summary_row import SummaryRow

if TYPE_CHECKING:
    from kdrun.run.stages import Stages


@SCHEMES.register("dml")
class MutualLearning(Scheme):
    """Deep mutual learning, Zhang et al. 2018 (CVPR): ``students`` copies of the student
    architecture trained together, each learning from the others (losses/mutual.py); no
    pre-trained teacher, and the loss group is not used. The cohort's first member is the
    ``distilled`` row, compared with the scratch student that has its init."""

    config_rules = {"students": number(2, integer=True), "T": number(0, lo_open=True)}
    roles = ("scratch", "distilled")
    has_teacher = False
    uses_transfer_set = False  # no teacher labels a transfer set
    batchable = False  # the cohort is one model of its own

    def __init__(self, students: int = 2, T: float = 1.0):
        self.students, self.T = int(students), float(T)

    def feature_teacher(self, cfg: DictConfig):
        return None

    def distillation_loss(self, cfg: DictConfig) -> dict:
        return {"name": "dml", "T": self.T}  # the cohort's own loss, not the loss group's

    def verdict_scope(self, cfg: DictConfig) -> None:
        return None  # no teacher: the students' seeds are all there is

    def run(self, stages: Stages, cfg: DictConfig) -> list[SummaryRow]:
        cohort = OmegaConf.create({"arch": "cohort", "size": self.students,
                                   "member": OmegaConf.to_container(cfg.student, resolve=True)})
        rows = []
        for seed in stages.student_seeds:
            rows.append(stages.student("scratch", CE, seed).row)
            distilled = stages.student("distilled", lambda: DML(T=self.T), seed,
                                       model_cfg=cohort, loss_cfg=self.distillation_loss(cfg))
            rows.append(distilled.row)
        return rows
