"""Self-distillation: the student's own architecture teaches it, generation after
generation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from omegaconf import DictConfig

from kdrun.checks import number
from kdrun.losses import CE, build_loss
from kdrun.run.provenance import seed_stream
from kdrun.run.schemes.base import SCHEMES, Scheme, teacher_targets
from kdrun.run.summary_row import StageResult, SummaryRow

if TYPE_CHECKING:
    from kdrun.run.stages import Stages


@SCHEMES.register("born_again")
class BornAgain(Scheme):
    """Born-again networks, Furlanello et al. 2018 (ICML): the teacher is the student's own
    architecture trained on the labels (generation 0); generation k is distilled from
    generation k-1, for ``generations`` generations. The last generation is the row
    ``distilled``; earlier ones are ``generation1``, ``generation2``, ... in the summary.
    Generation 0 is trained on the teacher's seed stream, so no generation shares its
    teacher's init."""

    config_rules = {"generations": number(1, integer=True)}
    roles = ("teacher", "scratch", "generation1", "distilled")  # generationN: one per
    # intermediate generation
    batchable = False  # each generation is taught by the one before: trained in turn

    def __init__(self, generations: int = 2):
        self.generations = int(generations)

    def teacher_stages(self, cfg: DictConfig) -> list[tuple[DictConfig, bool]]:
        return [(cfg.student, False)]  # the first generation's teacher is a student's twin

    def feature_teacher(self, cfg: DictConfig):
        return cfg.student  # a generation teaches the next one of the same architecture

    def run(self, stages: Stages, cfg: DictConfig) -> list[SummaryRow]:
        teacher = stages.teacher(cfg.student)
        rows = [teacher.row]
        for seed in stages.student_seeds:
            rows.append(stages.student("scratch", CE, seed).row)
            previous = teacher
            for generation in range(1, self.generations + 1):
                last = generation == self.generations
                role = "distilled" if last else f"generation{generation}"
                targets, columns = teacher_targets(stages, cfg, previous)
                # the last generation shares the scratch student's init and batch order;
                # each earlier one has a stream of its own, so no generation starts as its
                # teacher did
                train_seed = None if last else seed_stream(role, seed)
                student = stages.student(role, lambda: build_loss(cfg.loss), seed, targets,
                                         previous.entry.key, train_seed=train_seed)
                rows.append(student.row.with_columns(generation=generation, **columns))
                previous = StageResult(student.row, student.entry, stages.load_student(student))
        return rows
