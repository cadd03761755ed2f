"""What every distillation scheme is and can do, declared once with explicit defaults.

A scheme decides who teaches whom: which stages a run has, in which order. The
pipeline, validation, provenance and the batched launcher ask a scheme what it is
(these attributes and methods) and never switch on its name. To add one: subclass
``Scheme`` in a module of this folder (every module here is imported with the package),
decorate it with ``@SCHEMES.register("name")``, take its YAML keys as constructor
arguments (``config_rules`` checks them) and add ``configs/scheme/<name>.yaml``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar

from omegaconf import DictConfig, OmegaConf

from kdrun.checks import Check
from kdrun.errors import ConfigError
from kdrun.losses import CE, build_loss
from kdrun.registry import Registry
from kdrun.run.add_ons import Taught, add_on_rows
from kdrun.run.summary_row import StageResult, SummaryRow
from kdrun.train.targets import TeacherTargets

if TYPE_CHECKING:
    from kdrun.run.stages import Stages

log = logging.getLogger("kdrun")


class Scheme:
    """A scheme's declarations; ``run`` trains (or reuses) its stages."""

    config_rules: ClassVar[dict[str, Check]] = {}  # constructor key -> its check
    # the summary rows it makes, in order: the teacher's, then per student seed
    roles: ClassVar[tuple[str, ...]] = ("teacher", "scratch", "distilled")
    has_teacher: ClassVar[bool] = True  # a teacher (trained or given) makes the targets
    uses_transfer_set: ClassVar[bool] = True  # its distilled students learn from one too
    all_labels_reference: ClassVar[bool] = False  # can add the "scratch, all labels" row
    int8_students: ClassVar[bool] = False  # can add int8 rows (student.quantize=int8: PTQ, QAT)
    batchable: ClassVar[bool] = True  # the batched launcher can plan its students
    # a teacher with its own tokenizer (dataset.teacher_tokenizer): its targets aligned
    # to the student's positions; a scheme that writes or samples text does not align yet
    other_tokenizer: ClassVar[bool] = False
    data_parallel: ClassVar[bool] = True  # its stages can train on several processes
    # under a label budget (split.labeled), its teacher learns from the transfer set's true
    # labels too, where they exist
    teacher_learns_every_label: ClassVar[bool] = False
    shown: ClassVar[bool] = True  # its settings appear in the table's header
    # what of its distilled students' training rows carries no label, in words, beside a
    # transfer set (their hard-label term skips it): e.g. "the student's own text"
    unlabelled_rows: ClassVar[str | None] = None
    # its distilled students learn from the teacher's logits cached on the training set
    # (kdrun/train/targets.py), which the memory plan counts (kdrun/run/memory_plan.py)
    caches_teacher_logits: ClassVar[bool] = True
    name: str = ""  # the name it is registered (and configured) by, set by scheme_of

    def check(self, cfg: DictConfig) -> None:
        """Checks across config groups, at composition (ConfigError)."""

    def check_data(self, cfg: DictConfig, data) -> None:
        """Checks that need the loaded data, before anything trains (ConfigError;
        kdrun/run/data_checks.py calls it)."""

    def models(self, cfg: DictConfig) -> list[tuple[str, DictConfig]]:
        """Model configs it builds besides the teacher and student groups', each with the
        config key that names it: validated as those are."""
        return []

    def teacher_stages(self, cfg: DictConfig) -> list[tuple[DictConfig, bool]]:
        """The teachers it trains first, each as (model config, all_labels: whether it
        learns the transfer set's true labels too), in order: what the batched launcher
        plans, and trains stacked, before any student. A given one (``checkpoint``)
        trains nothing."""
        if not self.has_teacher:
            return []
        budget = cfg.split.get("labeled") is not None
        return [(cfg.teacher, self.teacher_learns_every_label and budget)]

    def feature_teacher(self, cfg: DictConfig):
        """The model config whose layer a feature loss's teacher side reads, or None when
        feature losses do not apply."""
        return cfg.teacher

    def distillation_loss(self, cfg: DictConfig) -> dict:
        """The loss the distilled student trains with: the loss group's."""
        return OmegaConf.to_container(cfg.loss, resolve=True)

    def verdict_scope(self, cfg: DictConfig) -> str | None:
        """Which teacher the student seeds share: what the gain's verdict holds for."""
        return f"one teacher (seed {cfg.seed})"

    def objective(self, cfg: DictConfig, over) -> dict | None:
        """Its own objectives in words, an Objective's fields (kdrun/run/objective.py),
        where its stages do not train as a distilled and a plain student do; None: those."""
        return None

    def selected_role(self, cfg: DictConfig) -> str:
        """The role whose validation metric is the run's (what a hyperparameter search
        optimises: kdrun/cli/main.py)."""
        return "distilled"

    def report(self, summary, header: str, run_dir) -> tuple[str, str] | None:
        """Its own printed table and one-line result, with any figure it draws into
        ``run_dir``; None: the comparison table (kdrun/report/table.py)."""
        return None

    def run(self, stages: Stages, cfg: DictConfig) -> list[SummaryRow]:
        raise NotImplementedError


SCHEMES = Registry("scheme", Scheme)


def scheme_of(cfg: DictConfig) -> Scheme:
    """The scheme ``cfg.scheme`` names, built with its keys."""
    node = OmegaConf.to_container(cfg.scheme, resolve=True)
    name = node.pop("name")
    scheme = SCHEMES.get(name, "scheme.name")(**node)
    scheme.name = name
    return scheme


def taught_students(stages: Stages, cfg: DictConfig, targets: TeacherTargets | None,
                    teacher_key: str, columns: dict) -> list[SummaryRow]:
    """Per student seed: the scratch row, then the row distilled from ``targets``, then the
    rows of the add-ons asked for (kdrun/run/add_ons.py: the all-labels reference, int8)."""
    rows = []
    for seed in stages.student_seeds:
        scratch = stages.student("scratch", CE, seed)
        distilled = stages.student("distilled", lambda: build_loss(cfg.loss), seed, targets,
                                   teacher_key)
        rows += [scratch.row, distilled.row.with_columns(**columns)]
        rows += add_on_rows(stages, cfg, Taught(seed, scratch, distilled, targets, teacher_key,
                                                columns))
    return rows


def teacher_targets(stages: Stages, cfg: DictConfig,
                    teacher: StageResult) -> tuple[TeacherTargets | None, dict]:
    """What the distilled student learns from, and how soft those targets are."""
    loss = build_loss(cfg.loss)
    if not loss.needs_teacher:
        log.info("loss=%s uses no teacher: the distill stage repeats scratch training "
                 "(a control; its gain should be about zero)", cfg.loss.name)
        return None, {}
    targets = stages.teacher_targets(teacher, loss)
    if "T" not in cfg.loss:
        return targets, {}
    return targets, {"soft_target_entropy": targets.soft_target_entropy(cfg.loss.T)}


def check_text_windows(data, scheme: str, prompt: int) -> None:
    """A language model's scheme (it continues prompts of the training windows): the data
    must be text, its windows longer than ``prompt``; one line before anything trains."""
    if not data.per_position:
        raise ConfigError("scheme.name", scheme, "needs a language model's data (targets per "
                          "position, e.g. dataset=text_lm)")
    positions = data.input_shape[0]
    if prompt >= positions and data.end_token is None:  # instructions: their own prompts
        raise ConfigError("scheme.prompt", prompt, f"must be shorter than the windows "
                          f"({positions} tokens)")
