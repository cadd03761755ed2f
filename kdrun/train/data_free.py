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
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kdrun.data import Data
from kdrun.errors import TrainingDiverged
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
from kdrun.train.features import FeatureTap
from kdrun.train.fit import (
    FitResult,
    evaluate,
    make_optimizer,
    make_schedule,
    metric_row,
    new_progress,
    record_epoch,
)
from kdrun.train.progress import StageProgress

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
    torch.manual_seed(seed)  # dropout masks
    draws = torch.Generator().manual_seed(seed)  # the generator's noise
    dtype = working_dtype(tcfg)
    model.to(device, dtype)
    loss_fn.to(device, dtype)
    generator = loss_fn.generator
    student_opt = make_optimizer(model.parameters(), tcfg, device)
    schedule = make_schedule(student_opt, tcfg, epochs)
    generator_opt = torch.optim.Adam(generator.parameters(), lr=s.generator_lr)
    test = data.test.to(device, dtype)
    state = new_progress(data.metric)
    if resume is not None:
        state = _restore(resume, model, loss_fn, student_opt, generator_opt, schedule, draws)

    def snapshot() -> dict:
        return {**state, "model": model.state_dict(), "loss": loss_fn.state_dict(),
                "optimizer": student_opt.state_dict(), "generator_optimizer":
                generator_opt.state_dict(),
                "schedule": schedule.state_dict() if schedule else None,
                "torch_rng": torch.get_rng_state(), "draws": draws.get_state()}

    def noise() -> torch.Tensor:
        return torch.randn(s.batch_size, s.z_dim, generator=draws, dtype=dtype).to(device)

    skip_nan = tcfg.get("on_nan", "stop") == "skip"
    bar = StageProgress(label or stage, epochs, state["epoch"], progress, data.metric)
    teacher_model = teacher.model.to(device, dtype)
    with frozen(teacher_model):
        prior = BatchNormPrior(teacher_model) if s.bn_prior else None
        tap = (FeatureTap(teacher_model, s.dafl_layer, "scheme.dafl_layer")
               if s.generator_loss == "dafl" else None)
        for epoch in range(state["epoch"] + 1, epochs + 1):
            model.train()
            generator.train()
            lr, t0 = student_opt.param_groups[0]["lr"], time.perf_counter()
            student_losses = torch.zeros(s.iterations * s.student_steps, device=device,
                                         dtype=dtype)
            generator_losses = torch.zeros(s.iterations, device=device, dtype=dtype)
            agree, skipped = torch.zeros((), device=device, dtype=torch.long), 0
            for it in range(s.iterations):
                for k in range(s.student_steps):
                    with torch.no_grad():
                        x = generator(noise())
                        t_logits = teacher_model(x)
                    s_logits = model(x)
                    loss = loss_fn(s_logits, t_logits)
                    if skip_nan and not torch.isfinite(loss):
                        skipped += 1
                        continue
                    student_opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if tcfg.grad_clip:
                        nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
                    student_opt.step()
                    student_losses[it * s.student_steps + k] = loss.detach()
                    agree += (s_logits.detach().argmax(1) == t_logits.argmax(1)).sum()
                x = generator(noise())
                if prior is not None:
                    prior.clear()
                t_logits = teacher_model(x)
                g_loss = loss_fn.generator_loss(
                    model(x) if s.generator_loss == "adversarial" else None, t_logits,
                    tap.read_float() if tap else None, prior)
                if skip_nan and not torch.isfinite(g_loss):
                    skipped += 1
                    continue
                generator_opt.zero_grad(set_to_none=True)
                g_loss.backward()
                generator_opt.step()
                generator_losses[it] = g_loss.detach()
                step = (epoch - 1) * s.iterations + it + 1
                if s.samples_every and step % s.samples_every == 0:
                    loss_fn.keep_samples(x, step)
            if schedule is not None:
                schedule.step()
            spread = sample_spread(x)
            _check_epoch(stage, epoch, student_losses, generator_losses, spread, lr, s, skipped)
            seconds = time.perf_counter() - t0
            seen = s.iterations * s.student_steps * s.batch_size
            rows = [metric_row(stage, epoch, "train", float(student_losses.mean()),
                               float(agree) / seen * 100, lr, seconds),
                    metric_row(stage, epoch, "generator", float(generator_losses.mean()),
                               spread * 100, s.generator_lr, seconds)]
            rows.append(metric_row(stage, epoch, "test", *evaluate(
                model, test, tcfg.eval_batch_size, data.metric), lr, seconds))
            record_epoch(state, epoch, [r for r in rows if r["split"] != "generator"], seconds,
                         lambda: {k: v.detach().clone() for k, v in model.state_dict().items()},
                         data.metric)
            on_epoch(rows, snapshot)
            bar.update(epoch, rows[0]["loss"], float("nan"))
        for hooks in (prior, tap):
            if hooks is not None:
                hooks.remove()
    bar.close()
    best = state["best"]
    return FitResult(stage=stage, seed=seed, epochs=epochs, best_epoch=best["epoch"],
                     val_acc_best=best["val"], test_acc_last=state["test_last"],
                     test_acc_best_val=best["test"], train_seconds=state["seconds"],
                     best_state=best["state"], optimizer_state=student_opt.state_dict(),
                     generated=epochs * s.iterations * (s.student_steps + 1) * s.batch_size)


def _check_epoch(stage: str, epoch: int, student_losses, generator_losses, spread: float,
                 lr: float, s: DataFreeSettings, skipped: int) -> None:
    """One line that ends the stage when a loss became NaN or infinite (trainer.on_nan=stop;
    with skip such steps were skipped) or the generator's samples stopped varying."""
    for who, losses, knob in (("student", student_losses, "trainer.lr"),
                              ("generator", generator_losses, "scheme.generator_lr")):
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            raise TrainingDiverged(
                f"{stage} stage diverged at epoch {epoch}: the {who}'s loss became NaN or "
                f"infinite (step {int(bad[0]) + 1} of the epoch); lower {knob}, set "
                f"trainer.grad_clip, or set trainer.on_nan=skip to skip such steps")
    if spread < s.collapse_below:
        raise TrainingDiverged(
            f"{stage} stage stopped at epoch {epoch}: the generator collapsed, its samples "
            f"spread {spread:.3f} across the batch (below scheme.collapse_below="
            f"{s.collapse_below}); lower scheme.generator_lr or change scheme.generator_loss")
    if skipped:
        log.warning(
            "%s epoch %d: skipped %d steps whose loss was NaN or infinite (trainer.on_nan=skip)",
            stage, epoch, skipped)


def _restore(state: dict, model, loss_fn, student_opt, generator_opt, schedule, draws) -> dict:
    """Load a snapshot() into the live objects; return its progress counters."""
    model.load_state_dict(state["model"])
    loss_fn.load_state_dict(state["loss"])
    student_opt.load_state_dict(state["optimizer"])
    generator_opt.load_state_dict(state["generator_optimizer"])
    if schedule is not None:
        schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["torch_rng"])
    draws.set_state(state["draws"])
    return {k: state[k] for k in ("epoch", "seconds", "test_last", "best")}
