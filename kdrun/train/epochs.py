"""The one epoch driver every training loop runs under.

A loop (a single model: ``fit``; a stacked group of students: ``train/stacked.py``; a
data-free round: ``train/data_free.py``) supplies only its training epoch, its
evaluation and its state. The driver owns what is the same for all of them: the
learning-rate schedule, every optimiser step (``OptimizerSteps``: gradient clipping; the
place for any new per-step option), the metric rows, the best epoch, resuming, and what
a NaN or infinite loss does. A loop trains ``size`` models at once (1 but in a stacked
group), each with its own rows, best epoch and result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kdrun.data.metrics import ACCURACY, Metric
from kdrun.errors import TrainingDiverged
from kdrun.train.optim import per_step

log = logging.getLogger("kdrun")


@dataclass
class FitResult:
    stage: str
    seed: int
    epochs: int
    best_epoch: int  # epoch with the best validation metric (first on ties); the last
    # epoch when there is no validation split
    val_metric_best: float  # the task's metric (accuracy, or perplexity); NaN without validation
    test_metric_last: float
    test_metric_best_val: float  # test metric at best_epoch: selected on val, never on test
    train_seconds: float
    best_state: dict = field(repr=False)  # weights at best_epoch; the model keeps the last ones
    optimizer_state: dict = field(repr=False)
    generated: int | None = None  # inputs a generator made for it (a data-free stage)


@dataclass
class EpochTrained:
    """What one member's training epoch gave: its mean loss and training score, why its
    stage must stop (a NaN loss, a collapsed generator) or None, how many steps were
    skipped (``trainer.on_nan=skip``), and rows besides "train" as (split, loss, score,
    lr), e.g. a data-free generator's."""

    loss: float
    score: float  # the train row's score: training accuracy (data-free: agreement)
    failure: str | None = None
    skipped: int = 0
    extra_rows: list[tuple[str, float, float, float]] = field(default_factory=list)


class OptimizerSteps:
    """Every optimiser step of every loop. A loop hands each batch's loss to ``backward``
    and then calls ``take``; this decides when the optimiser steps (every ``accumulate``
    batches, their gradients summed, weighted by rows: the gradient of the mean over the
    global batch), and what each step does: the loop's gradient sum over processes
    (``sync``), the clipping ``grad_clip`` asks for (``clip(max_norm)``: each loop says once
    how it clips, one model or each member of a stack), the step, and a per-step
    schedule's advance (``schedule_unit: step``). A trainer option that acts per step is
    written here once."""

    def __init__(self, tcfg, loop: EpochLoop):
        self.grad_clip, self.loop = tcfg.get("grad_clip"), loop
        self.every = tcfg.get("accumulate") or 1
        self.schedule = loop.schedule if per_step(tcfg) else None
        self.batches = self.rows = 0  # since the last step

    def backward(self, loss: torch.Tensor | None, rows: int) -> None:
        """The gradients of a batch of ``rows`` (global) rows whose ``loss`` is a mean over
        them (None: this process has no rows of it)."""
        if loss is not None:
            (loss if self.every == 1 else loss * rows).backward()
        self.rows += rows

    def take(self, optimizer: torch.optim.Optimizer) -> None:
        """After each batch's ``backward``: a step, once ``accumulate`` batches are in."""
        self.batches += 1
        if self.batches == self.every:
            self.step(optimizer)

    def flush(self, optimizer: torch.optim.Optimizer) -> None:
        """At an epoch's end: a step on the last batches, fewer than ``accumulate``."""
        if self.batches:
            self.step(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """One optimiser step on the gradients gathered since the last."""
        self.loop.sync(self.rows)
        if self.every > 1:  # the sum of rows x mean over each batch, to the mean over all
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.div_(self.rows)
        if self.grad_clip:
            self.loop.clip(self.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.schedule is not None:
            self.schedule.step()
        self.batches = self.rows = 0


class EpochLoop(Protocol):
    """What a training loop supplies to ``drive``."""

    tcfg: object  # the trainer config
    size: int  # models trained together
    alive: list[bool]  # members still training (a stacked member can fail alone)
    optimizer: torch.optim.Optimizer  # its learning rate is the rows' and the schedule's
    schedule: object | None

    def train_epoch(self, epoch: int, steps: OptimizerSteps) -> list[EpochTrained]: ...

    def clip(self, max_norm: float) -> None: ...  # the gradient clipping of one step

    def sync(self, rows: int) -> None: ...  # gradients summed over processes, before a step

    def evaluate(self, split) -> list[tuple[float, float]]: ...  # per member: loss, metric

    def weights(self, i: int) -> dict: ...  # a copy of member i's weights now

    def snapshot(self, progress: list[dict]) -> dict: ...  # the resumable state

    def restore(self, state: dict) -> list[dict]: ...  # back into it; the progress


class Progress(Protocol):
    def update(self, epoch: int, loss: float, val: float) -> None: ...

    def close(self) -> None: ...


def drive(loop: EpochLoop, *, stages: list[str], epochs: int, splits: dict, metric: Metric,
          device: torch.device, bar: Callable[[int], Progress], resume: dict | None = None,
          on_epoch: Callable[[list[tuple[int, list[dict]]], Callable[[], dict]], None],
          on_failure: Callable[[int, str], None] | None = None) -> list[dict]:
    """Train ``loop`` from the start or from ``resume`` (a ``snapshot``) to ``epochs``,
    evaluating on ``splits`` ({"val": ..., "test": ...}, those present) after each epoch.
    ``on_epoch`` gets each live member's metric rows and a function giving the loop's
    resumable state. A member whose epoch failed raises TrainingDiverged, or with
    ``on_failure`` is reported there and stops while the others go on. ``bar(epochs
    done)`` shows the progress. Returns each member's progress (its best epoch, weights
    and metrics)."""
    progress = (loop.restore(resume) if resume is not None
                else [new_progress(metric) for _ in range(loop.size)])
    start = max(p["epoch"] for p in progress)  # a member stopped early stays behind
    bar = bar(start)
    steps = OptimizerSteps(loop.tcfg, loop)
    for epoch in range(start + 1, epochs + 1):
        lr = loop.optimizer.param_groups[0]["lr"]  # per-step schedules: the epoch's first
        t0 = time.perf_counter()
        trained = loop.train_epoch(epoch, steps)
        steps.flush(loop.optimizer)
        if loop.schedule is not None and steps.schedule is None:
            loop.schedule.step()
        if device.type == "cuda":
            torch.cuda.synchronize()  # kernels run asynchronously: time them, not their launch
        seconds = (time.perf_counter() - t0) / loop.size  # each member's share
        live = _stop_failed(loop, trained, on_failure, stages, epoch)
        evaluated = {name: loop.evaluate(split) for name, split in splits.items()}
        out, val = [], {}
        for i in live:
            rows = epoch_rows(stages[i], epoch, trained[i], evaluated, i, lr, seconds)
            val[i] = record_epoch(progress[i], epoch, rows, seconds,
                                  lambda i=i: loop.weights(i), metric)
            out.append((i, rows))
        on_epoch(out, lambda: loop.snapshot(progress))
        if live:
            bar.update(epoch, trained[live[0]].loss, val[live[0]])
    bar.close()
    return progress


def _stop_failed(loop: EpochLoop, trained: list[EpochTrained], on_failure,
                 stages: list[str], epoch: int) -> list[int]:
    """The members that go on after this epoch: a failed one raises, or stops alone."""
    live = []
    for i, member in enumerate(trained):
        if not loop.alive[i]:
            continue
        if member.failure is not None:
            if on_failure is None:
                raise TrainingDiverged(member.failure)
            loop.alive[i] = False
            on_failure(i, member.failure)
            continue
        if member.skipped:
            log.warning("%s epoch %d: skipped %d steps whose loss was NaN or infinite "
                        "(trainer.on_nan=skip)", stages[i], epoch, member.skipped)
        live.append(i)
    return live


def epoch_rows(stage: str, epoch: int, trained: EpochTrained, evaluated: dict, i: int,
               lr: float, seconds: float) -> list[dict]:
    """A member's metric rows of one epoch: train, the loop's own, then each split's."""
    rows = [metric_row(stage, epoch, "train", trained.loss, trained.score, lr, seconds)]
    rows += [metric_row(stage, epoch, split, loss, value, row_lr, seconds)
             for split, loss, value, row_lr in trained.extra_rows]
    rows += [metric_row(stage, epoch, name, *per_member[i], lr, seconds)
             for name, per_member in evaluated.items()]
    return rows


def result_of(progress: dict, *, stage: str, seed: int, epochs: int, optimizer_state: dict,
              generated: int | None = None) -> FitResult:
    """A member's FitResult from its progress."""
    best = progress["best"]
    return FitResult(stage=stage, seed=seed, epochs=epochs, best_epoch=best["epoch"],
                     val_metric_best=best["val"], test_metric_last=progress["test_last"],
                     test_metric_best_val=best["test"], train_seconds=progress["seconds"],
                     best_state=best["state"], optimizer_state=optimizer_state,
                     generated=generated)


def training_state(progress: dict, parts: dict, draws: dict[str, torch.Generator]) -> dict:
    """A resumable snapshot of a training loop: its progress counters, the state of each of
    its ``parts`` (model, loss, optimisers, schedule: None stays None), of each of its own
    random generators, and of torch's global ones (CPU, and CUDA where there is one)."""
    return {**progress,
            **{name: part.state_dict() if part is not None else None
               for name, part in parts.items()},
            **{name: generator.get_state() for name, generator in draws.items()},
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_training(state: dict, parts: dict, draws: dict[str, torch.Generator]) -> dict:
    """Load a training_state() into the live ``parts`` and generators; return its progress
    counters."""
    for name, part in parts.items():
        if part is not None:
            part.load_state_dict(state[name])
    for name, generator in draws.items():
        generator.set_state(state[name])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return {k: state[k] for k in ("epoch", "seconds", "test_last", "best")}


def new_progress(metric: Metric = ACCURACY) -> dict:
    """A fit's counters before its first epoch, with its best-so-far."""
    return {"epoch": 0, "seconds": 0.0, "test_last": 0.0,
            "best": {"epoch": 0, "val": metric.worst, "test": 0.0, "state": None}}


def record_epoch(progress: dict, epoch: int, rows: list[dict], seconds: float,
                 weights: Callable[[], dict], metric: Metric = ACCURACY) -> float:
    """Count an epoch's metric rows into ``progress``. The best epoch is the first with
    the best validation ``metric``, or the last one when there is no validation split;
    ``weights()`` gives the copy of the weights kept for it. Returns the epoch's
    validation metric (NaN without a validation split)."""
    by_split = {row["split"]: row["score"] for row in rows}
    val, test = by_split.get("val", float("nan")), by_split["test"]
    best = progress["best"]
    if metric.better(val, best["val"]) or "val" not in by_split:
        best.update(epoch=epoch, val=val, test=test, state=weights())
    progress.update(epoch=epoch, test_last=test, seconds=progress["seconds"] + seconds)
    return val


def metric_row(stage, epoch, split, loss, score, lr, seconds) -> dict:
    """One row of metrics.csv (kdrun/report/logs.py: METRIC_COLUMNS)."""
    return {"stage": stage, "epoch": epoch, "split": split, "loss": loss, "score": score,
            "lr": lr, "seconds": seconds}
