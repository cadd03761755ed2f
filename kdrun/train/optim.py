"""The optimiser and the learning-rate schedule of a stage (``trainer.optimizer``,
``trainer.schedule``), built alike for every training loop."""

from __future__ import annotations

import functools
import math

import torch


def make_optimizer(params, tcfg, device: torch.device) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD; with ``fused_optimizer`` one fused kernel per step (CUDA, and
    CPU from torch 2.4: most of a small model's step is otherwise the optimiser's own
    per-tensor Python), falling back to the plain loop where a build has no fused one."""
    params = list(params)
    if tcfg.optimizer == "sgd":
        cls, kwargs = torch.optim.SGD, {"momentum": tcfg.momentum}
    else:
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[tcfg.optimizer]
        kwargs = {"betas": tuple(tcfg.get("betas") or (0.9, 0.999))}
    kwargs.update(lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    return cls(params, fused=True, **kwargs) if uses_fused(tcfg, device) else cls(params, **kwargs)


def uses_fused(tcfg, device: torch.device) -> bool:
    """Whether a stage's optimiser runs fused kernels: asked for, and this build has them."""
    return bool(tcfg.get("fused_optimizer")) and fused_kernel_exists(tcfg.optimizer, device.type)


@functools.cache
def fused_kernel_exists(optimizer: str, device_type: str) -> bool:
    """Whether this torch build has a fused ``optimizer`` kernel for ``device_type``."""
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optimizer]
    try:
        probe = torch.zeros(1, device=device_type, requires_grad=True)
        cls([probe], lr=0.1, fused=True)
        return True
    except (RuntimeError, TypeError):  # no fused kernel for this device or build
        return False


def make_schedule(optimizer, tcfg, epochs: int, batches: int):
    """The learning-rate schedule of a stage of ``epochs`` epochs of ``batches`` batches,
    or None for a constant rate: advanced every epoch, or with ``schedule_unit: step``
    every optimiser step (``per_step_factor``)."""
    if per_step(tcfg):
        total = epochs * steps_per_epoch(tcfg, batches)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(per_step_factor, tcfg.schedule, total,
                                         warmup_steps(tcfg, total), floor(tcfg)))
    if tcfg.schedule == "multistep":
        milestones, gamma = list(tcfg.milestones), tcfg.gamma
        warmup = tcfg.get("warmup_epochs") or 0

        def factor(done: int) -> float:  # the lr of epoch done + 1, over the base lr
            ramp = min(1.0, (done + 1) / warmup) if warmup else 1.0
            return ramp * gamma ** sum(done >= m for m in milestones)

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if tcfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs,
                                                          eta_min=tcfg.get("min_lr") or 0.0)
    if tcfg.schedule == "linear":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(per_step_factor, "linear", epochs, 0, floor(tcfg)))
    if tcfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, tcfg.step_size, tcfg.gamma)
    return None


def per_step(tcfg) -> bool:
    return tcfg.get("schedule_unit", "epoch") == "step"


def steps_per_epoch(tcfg, batches: int) -> int:
    """Optimiser steps in an epoch of ``batches`` batches: one per ``accumulate``."""
    return math.ceil(batches / (tcfg.get("accumulate") or 1))


def warmup_steps(tcfg, total: int) -> int:
    """``warmup_steps``: a number of steps, or below 1 a share of the ``total``."""
    warmup = tcfg.get("warmup_steps") or 0
    return round(warmup * total) if 0 < warmup < 1 else int(warmup)


def floor(tcfg) -> float:
    """``min_lr`` over the base rate: where cosine and linear decay end."""
    return (tcfg.get("min_lr") or 0.0) / tcfg.lr


def per_step_factor(schedule: str, total: int, warmup: int, end: float, done: int) -> float:
    """The rate of step ``done + 1`` of ``total``, over the base rate: step k <= ``warmup``
    at k / warmup of it; then from the base rate at the first step after the warm-up down
    to ``end`` of it at the last step, along half a cosine or a line (``none``: the base
    rate throughout)."""
    if done < warmup:
        return (done + 1) / warmup
    progress = min(1.0, (done - warmup) / max(1, total - warmup - 1))
    if schedule == "cosine":
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return end + (1 - end) * (1 - progress)
    return 1.0
