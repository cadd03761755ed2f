"""Data-free distillation: the student learns from a generator's inputs and the teacher's
answers on them, never from a training example."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from omegaconf import DictConfig
from torch import nn

from kdrun.checks import PROBABILITY, layer_name, number, one_of
from kdrun.errors import ConfigError
from kdrun.losses import CE
from kdrun.models import meta_model
from kdrun.report.samples_figure import draw_samples
from kdrun.run.schemes.base import SCHEMES, Scheme
from kdrun.run.summary_row import SummaryRow
from kdrun.train.data_free import DataFreeGame, DataFreeSettings

if TYPE_CHECKING:
    from kdrun.run.stages import Stages

POSITIVE = number(0, lo_open=True)
COUNT = number(1, integer=True)
WEIGHT = number(0)
# Keys that change what is drawn, not what is trained: kept out of the stage's key.
PICTURE_ONLY = ("samples_every",)


@SCHEMES.register("data_free")
class DataFree(Scheme):
    """Data-free distillation (the survey's family; DFAD, Fang et al. 2019; DAFL, Chen et
    al. 2019; DeepInversion's prior, Yin et al. 2020): the teacher is trained as in
    ``offline`` (or given); per student seed, the scratch student learns from the labels
    and the ``distilled`` one from generated inputs only (kdrun/train/data_free.py): it
    sees no training, validation or unlabelled example, and is taken at its last epoch.
    With a label budget (``split.labeled``) the teacher, the data owner's, learns from
    every label and the scratch student from the budget: data-free against a few labels."""

    config_rules = {
        "generator_loss": one_of("adversarial", "dafl"), "discrepancy": one_of("l1", "kl"),
        "z_dim": COUNT, "width": COUNT, "batch_size": number(2, integer=True),
        "iterations": COUNT, "student_steps": COUNT, "generator_lr": POSITIVE,
        "dafl_one_hot": WEIGHT, "dafl_activation": WEIGHT, "dafl_entropy": WEIGHT,
        "dafl_layer": layer_name, "bn_prior": WEIGHT, "samples_every": number(0, integer=True),
        "collapse_below": PROBABILITY}
    uses_transfer_set = False  # the distilled student reads no example at all
    caches_teacher_logits = False  # the teacher scores the generator's inputs live
    batchable = False  # its stage trains a generator with the student
    data_parallel = False  # the generator's batches are not sharded
    teacher_learns_every_label = True  # under a label budget: the data owner's teacher

    def __init__(self, generator_loss: str = "adversarial", discrepancy: str = "l1",
                 z_dim: int = 100, width: int = 64, batch_size: int = 512, iterations: int = 50,
                 student_steps: int = 5, generator_lr: float = 1e-3, dafl_one_hot: float = 1.0,
                 dafl_activation: float = 0.1, dafl_entropy: float = 5.0,
                 dafl_layer: str = "penultimate", bn_prior: float = 0.0,
                 samples_every: int = 50, collapse_below: float = 0.05):
        self.settings = DataFreeSettings(
            generator_loss, discrepancy, int(z_dim), int(width), int(batch_size),
            int(iterations), int(student_steps), float(generator_lr), float(dafl_one_hot),
            float(dafl_activation), float(dafl_entropy), str(dafl_layer), float(bn_prior),
            int(samples_every), float(collapse_below))

    def distillation_loss(self, cfg: DictConfig) -> dict:
        return {"name": "data_free"}  # its settings: the scheme's, in the table's header

    def feature_teacher(self, cfg: DictConfig):
        return None  # the loss group is not used

    def verdict_scope(self, cfg: DictConfig) -> str:
        if cfg.teacher.get("checkpoint"):
            return f"one teacher ({cfg.teacher.checkpoint})"
        return super().verdict_scope(cfg)

    def run(self, stages: Stages, cfg: DictConfig) -> list[SummaryRow]:
        budget = cfg.split.get("labeled") is not None
        teacher = stages.teacher(cfg.teacher, all_labels=budget)
        self.check_teacher(teacher.model)
        settings = {k: v for k, v in dataclasses.asdict(self.settings).items()
                    if k not in PICTURE_ONLY}
        rows = [teacher.row]
        for seed in stages.student_seeds:
            rows.append(stages.student("scratch", CE, seed).row)
            picture = stages.run_dir.root / f"samples_seed{seed}.png"
            student = stages.data_free_student(seed, teacher,
                                               self.game_maker(stages, picture), settings)
            draw_samples(picture, student.entry.result()["loss_state"]["_extra_state"])
            rows.append(student.row)
        return rows

    def game_maker(self, stages: Stages, picture):
        """The factory of a stage's generator and losses, drawing its samples into
        ``picture`` as training keeps them."""
        def make() -> DataFreeGame:
            game = DataFreeGame(self.settings, stages.data.input_shape)
            game.on_samples = lambda g: draw_samples(picture, g.get_extra_state())
            return game
        return make

    def check(self, cfg: DictConfig) -> None:
        """A student's batches alternate with its generator's steps: none accumulate."""
        if (cfg.trainer.get("accumulate") or 1) > 1:
            raise ConfigError("trainer.accumulate", cfg.trainer.accumulate, "must be 1 with "
                              "scheme=data_free: the generator steps between the student's "
                              "batches")

    def check_data(self, cfg: DictConfig, data) -> None:
        """Inputs a generator can make: numbers held in memory; and a teacher whose layers
        its generator's loss reads (built on the meta device)."""
        if not getattr(data.test, "in_memory", False):
            raise ConfigError("scheme.name", "data_free", f"dataset={data.name} is read "
                              "from disk; data-free distillation runs on in-memory data sets "
                              "(mnist1d, digits, synthetic, mnist, cifar10, ...)")
        if not data.test.x.is_floating_point():
            raise ConfigError("scheme.name", "data_free", f"dataset={data.name} gives "
                              "token ids, which a generator cannot make by gradient; use "
                              "images or sequences of numbers")
        self.check_teacher(meta_model(cfg.teacher, data.input_shape, data.num_classes))

    def check_teacher(self, teacher: nn.Module | None) -> None:
        """DeepInversion's prior reads the teacher's batch-norm layers: it needs some (a
        teacher that cannot be built on the meta device is checked once trained)."""
        if teacher is None:
            return
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                     for m in teacher.modules())
        if self.settings.bn_prior and not has_bn:
            raise ConfigError("scheme.bn_prior", self.settings.bn_prior, "needs a teacher with "
                              "batch norm (e.g. teacher.batch_norm=true); set it to 0")
