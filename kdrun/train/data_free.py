"""Data-free distillation's training loop: a generator makes the inputs, the teacher labels
them, the student learns from its answers; no training example, label or validation
example is ever read (scheme=data_free, kdrun/run/schemes/data_free.py).

Each generator step follows ``student_steps`` student steps, as in DFAD (Fang et al. 2019,
"Data-Free Adversarial Distillation"): the student minimises the discrepancy between its
logits and the teacher's on fresh samples; then the generator either maximises that
discrepancy (``adversarial``) or minimises DAFL's teacher-only terms (``dafl``, Chen et
al. 2019), plus DeepInversion's batch-norm prior when ``bn_prior`` > 0. An epoch is
``iterations`` generator steps, then the student is evaluated on the test split.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kdrun.data import Data
from kdrun.losses.base import DistillationLoss
from kdrun.losses.data_free import (
    DISCREPANCIES,
    BatchNormPrior,
    activation_loss,
    information_entropy_loss,
    one_hot_loss,
)
from kdrun.models.generator import Generator, sample_spread
from kdrun.precision import working_dtype
from kdrun.train.epochs import (
    EpochTrained,
    FitResult,
    OptimizerSteps,
)
from kdrun.train.features import FeatureTap
from kdrun.train.fit import OneModel
from kdrun.train.optim import make_optimizer, make_schedule

log = logging.getLogger("kdrun")
SAMPLES_SHOWN = 8  # generated inputs kept for the picture at each snapshot


@dataclass(frozen=True)
class DataFreeSettings:
    """scheme=data_free's keys (configs/scheme/data_free.yaml says what each does)."""

    generator_loss: str = "adversarial"
    discrepancy: str = "l1"
    z_dim: int = 100
    width: int = 64
    batch_size: int = 512
    iterations: int = 50
    student_steps: int = 5
    generator_lr: float = 1e-3
    dafl_one_hot: float = 1.0
    dafl_activation: float = 0.1
    dafl_entropy: float = 5.0
    dafl_layer: str = "penultimate"
    bn_prior: float = 0.0
    samples_every: int = 50
    collapse_below: float = 0.05


class DataFreeGame(DistillationLoss):
    """The student's loss on generated inputs, and the generator with its own loss: what a
    data-free stage trains besides the student. Its state (the generator's weights, and
    the samples kept for the picture) is saved with the stage as a loss's is."""

    def __init__(self, settings: DataFreeSettings, input_shape):
        super().__init__()
        self.settings = settings
        self.generator = Generator(input_shape, settings.z_dim, settings.width)
        self.discrepancy = DISCREPANCIES[settings.discrepancy]
        self.samples: list[torch.Tensor] = []  # SAMPLES_SHOWN inputs per snapshot
        self.sample_steps: list[int] = []  # the generator step of each snapshot
        self.on_samples: Callable[[DataFreeGame], None] | None = None  # e.g. draw samples.png

    def forward(self, student_logits, teacher_logits, labels=None, student_feature=None,
                teacher_feature=None) -> torch.Tensor:
        return self.discrepancy(student_logits, teacher_logits)

    def generator_loss(self, student_logits, teacher_logits, features, prior) -> torch.Tensor:
        """The generator's loss on one batch: minus the discrepancy (adversarial) or DAFL's
        weighted terms, plus the weighted batch-norm prior."""
        s = self.settings
        if s.generator_loss == "adversarial":
            loss = -self.discrepancy(student_logits, teacher_logits)
        else:
            loss = (s.dafl_one_hot * one_hot_loss(teacher_logits)
                    + s.dafl_activation * activation_loss(features)
                    + s.dafl_entropy * information_entropy_loss(teacher_logits))
        return loss + s.bn_prior * prior.loss() if prior is not None else loss

    def keep_samples(self, x: torch.Tensor, step: int) -> None:
        self.samples.append(x[:SAMPLES_SHOWN].detach().float().cpu())
        self.sample_steps.append(step)
        if self.on_samples is not None:
            self.on_samples(self)

    def get_extra_state(self) -> dict:
        return {"samples": list(self.samples), "sample_steps": list(self.sample_steps)}

    def set_extra_state(self, state: dict) -> None:
        self.samples, self.sample_steps = list(state["samples"]), list(state["sample_steps"])


@contextlib.contextmanager
def frozen(model: nn.Module):
    """The teacher in eval mode without gradients for its weights (the generator's still
    flow through it), as it was afterwards."""
    was_training = model.training
    wanted = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), wanted):
            p.requires_grad_(flag)
        model.train(was_training)


def fit_data_free(model: nn.Module, data: Data, loss_fn: DataFreeGame, tcfg, *, stage: str,
                  epochs: int, seed: int, device: torch.device, teacher=None, augment=None,
                  resume: dict | None = None,
                  on_epoch: Callable[[list[dict], Callable[[], dict]], None] = lambda r, s: None,
                  progress: bool = True, label: str | None = None) -> FitResult:
    """fit()'s contract (kdrun/train/fit.py) for a data-free student: ``teacher.model`` is
    the frozen teacher; ``data`` gives only the test split (and the metric); the selected
    epoch is the last (no validation example is read). ``resume`` continues a snapshot to
    the bit-identical end of an uninterrupted run."""
    s = loss_fn.settings
    loop = DataFreeLoop(model, loss_fn, tcfg, epochs=epochs, seed=seed, device=device,
                        metric=data.metric, stage=stage)
    teacher_model = teacher.model.to(device, loop.dtype)
    with frozen(teacher_model), teacher_hooks(teacher_model, s) as (prior, tap):
        loop.teacher, loop.prior, loop.tap = teacher_model, prior, tap
        return loop.drive(
            stage=stage, epochs=epochs, seed=seed, device=device, resume=resume,
            splits={"test": data.test.to(device, loop.dtype)}, on_epoch=on_epoch,
            progress=progress, label=label,
            generated=epochs * s.iterations * (s.student_steps + 1) * s.batch_size)


class DataFreeLoop(OneModel):
    """fit_data_free's loop for the epoch driver (kdrun/train/epochs.py): the student, its
    game (the generator and its optimiser), the noise's draws; each epoch a Round."""

    def __init__(self, model: nn.Module, game: DataFreeGame, tcfg, *, epochs: int, seed: int,
                 device: torch.device, metric, stage: str):
        s = game.settings
        torch.manual_seed(seed)  # dropout masks
        self.noise_draws = torch.Generator().manual_seed(seed)  # the generator's noise
        self.dtype = dtype = working_dtype(tcfg)
        model.to(device, dtype)
        game.to(device, dtype)
        self.model, self.game, self.tcfg, self.device = model, game, tcfg, device
        self.metric, self.stage, self.alive = metric, stage, [True]
        self.optimizer = make_optimizer(model.parameters(), tcfg, device)
        self.schedule = make_schedule(self.optimizer, tcfg, epochs,
                                      s.iterations * s.student_steps)
        self.generator_opt = torch.optim.Adam(game.generator.parameters(), lr=s.generator_lr)
        self.parts = {"model": model, "loss": game, "optimizer": self.optimizer,
                      "generator_optimizer": self.generator_opt, "schedule": self.schedule}
        self.draws = {"draws": self.noise_draws}
        self.teacher = self.prior = self.tap = None  # set by fit_data_free

    def noise(self) -> torch.Tensor:
        s = self.game.settings
        return torch.randn(s.batch_size, s.z_dim, generator=self.noise_draws,
                           dtype=self.dtype).to(self.device)

    def train_epoch(self, epoch: int, steps: OptimizerSteps) -> list[EpochTrained]:
        lr = self.optimizer.param_groups[0]["lr"]
        this_epoch = Round(self.model, self.teacher, self.game, self.optimizer,
                           self.generator_opt, self.noise, self.prior, self.tap, steps,
                           self.tcfg)
        spread = sample_spread(this_epoch.play(epoch))
        return [this_epoch.trained(self.stage, epoch, spread, lr)]


@contextlib.contextmanager
def teacher_hooks(teacher: nn.Module, s: DataFreeSettings):
    """The taps the generator's loss reads on the teacher: its batch-norm layers' inputs
    (bn_prior) and DAFL's feature layer; removed afterwards, whatever happens."""
    prior = BatchNormPrior(teacher) if s.bn_prior else None
    tap = FeatureTap(teacher, s.dafl_layer, "scheme.dafl_layer") \
        if s.generator_loss == "dafl" else None
    try:
        yield prior, tap
    finally:
        for hooks in (prior, tap):
            if hooks is not None:
                hooks.remove()


class Round:
    """One epoch of the game: ``iterations`` times, ``student_steps`` student steps then
    one generator step; it keeps the epoch's losses for its metric rows and checks."""

    def __init__(self, student, teacher, game: DataFreeGame, student_opt, generator_opt,
                 noise, prior, tap, steps: OptimizerSteps, tcfg):
        self.student, self.teacher, self.game, self.steps = student, teacher, game, steps
        self.student_opt, self.generator_opt, self.noise = student_opt, generator_opt, noise
        self.prior, self.tap, self.s = prior, tap, game.settings
        self.skip_nan = tcfg.get("on_nan", "stop") == "skip"
        device, dtype = next(student.parameters()).device, next(student.parameters()).dtype
        self.student_losses = torch.zeros(self.s.iterations * self.s.student_steps,
                                          device=device, dtype=dtype)
        self.generator_losses = torch.zeros(self.s.iterations, device=device, dtype=dtype)
        self.agree = torch.zeros((), device=device, dtype=torch.long)
        self.skipped = 0

    def play(self, epoch: int) -> torch.Tensor:
        """Play the epoch; returns the generator's last batch."""
        self.student.train()
        self.game.generator.train()
        for it in range(self.s.iterations):
            for k in range(self.s.student_steps):
                self.student_step(it * self.s.student_steps + k)
            x = self.generator_step(it)
            step = (epoch - 1) * self.s.iterations + it + 1
            if self.s.samples_every and step % self.s.samples_every == 0:
                self.game.keep_samples(x, step)
        return x

    def student_step(self, index: int) -> None:
        """The student learns the teacher's logits on fresh samples."""
        with torch.no_grad():
            x = self.game.generator(self.noise())
            t_logits = self.teacher(x)
        s_logits = self.student(x)
        loss = self.game(s_logits, t_logits)
        if self.skip_nan and not torch.isfinite(loss):
            self.skipped += 1
            return
        # the generator's step left gradients on the student: accumulate is 1 here
        self.student_opt.zero_grad(set_to_none=True)
        self.steps.backward(loss, len(x))
        self.steps.take(self.student_opt)
        self.student_losses[index] = loss.detach()
        self.agree += (s_logits.detach().argmax(1) == t_logits.argmax(1)).sum()

    def generator_step(self, index: int) -> torch.Tensor:
        """The generator's step on its loss (kdrun/losses/data_free.py); returns its batch."""
        x = self.game.generator(self.noise())
        if self.prior is not None:
            self.prior.clear()
        t_logits = self.teacher(x)
        adversarial = self.s.generator_loss == "adversarial"
        loss = self.game.generator_loss(self.student(x) if adversarial else None, t_logits,
                                        self.tap.read_float() if self.tap else None,
                                        self.prior)
        if self.skip_nan and not torch.isfinite(loss):
            self.skipped += 1
            return x
        self.generator_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.generator_opt.step()
        self.generator_losses[index] = loss.detach()
        return x

    def trained(self, stage: str, epoch: int, spread: float, lr: float) -> EpochTrained:
        """train: the student's mean discrepancy and its agreement with the teacher's top
        class (%); generator: its mean loss and its samples' spread (%); why the stage
        stops, if it must."""
        seen = self.s.iterations * self.s.student_steps * self.s.batch_size
        return EpochTrained(
            float(self.student_losses.mean()), float(self.agree) / seen * 100,
            self.failure(stage, epoch, spread), self.skipped,
            [("generator", float(self.generator_losses.mean()), spread * 100,
              self.s.generator_lr)])

    def failure(self, stage: str, epoch: int, spread: float) -> str | None:
        """One line that ends the stage when a loss became NaN or infinite
        (trainer.on_nan=stop; with skip such steps were skipped) or the generator's samples
        stopped varying."""
        for who, losses, knob in (("student", self.student_losses, "trainer.lr"),
                                  ("generator", self.generator_losses, "scheme.generator_lr")):
            bad = (~torch.isfinite(losses)).nonzero()
            if len(bad):
                return (f"{stage} stage diverged at epoch {epoch}: the {who}'s loss became NaN "
                        f"or infinite (step {int(bad[0]) + 1} of the epoch); lower {knob}, set "
                        f"trainer.grad_clip, or set trainer.on_nan=skip to skip such steps")
        if spread < self.s.collapse_below:
            return (f"{stage} stage stopped at epoch {epoch}: the generator collapsed, its "
                    f"samples spread {spread:.3f} across the batch (below "
                    f"scheme.collapse_below={self.s.collapse_below}); lower "
                    f"scheme.generator_lr or change scheme.generator_loss")
        return None
