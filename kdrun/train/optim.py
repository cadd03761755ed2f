"""The optimiser and the learning-rate schedule of a stage (``trainer.optimizer``,
``trainer.schedule``), built alike for every training loop."""

from __future__ import annotations

import functools

import torch


def make_optimizer(params, tcfg, device: torch.device) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD; with ``fused_optimizer`` one fused kernel per step (CUDA, and
    CPU from torch 2.4: most of a small model's step is otherwise the optimiser's own
    per-tensor Python), falling back to the plain loop where a build has no fused one."""
    params = list(params)
    if tcfg.optimizer == "sgd":
        cls, kwargs = torch.optim.SGD, {"momentum": tcfg.momentum}
    else:
        cls, kwargs = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[tcfg.optimizer], {}
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


def make_schedule(optimizer, tcfg, epochs: int):
    """Per-epoch learning-rate schedule, or None for a constant rate."""
    if tcfg.schedule == "multistep":
        milestones, gamma = list(tcfg.milestones), tcfg.gamma
        warmup = tcfg.get("warmup_epochs") or 0

        def factor(done: int) -> float:  # the lr of epoch done + 1, over the base lr
            ramp = min(1.0, (done + 1) / warmup) if warmup else 1.0
            return ramp * gamma ** sum(done >= m for m in milestones)

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if tcfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if tcfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, tcfg.step_size, tcfg.gamma)
    return None
