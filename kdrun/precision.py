"""The floating-point precision a stage computes in: float32 (with bf16 autocast and TF32
on CUDA when asked) or float64 (``trainer.float64``), and the name a stage key holds
for it."""

from __future__ import annotations

import torch


def working_dtype(tcfg) -> torch.dtype:
    """The dtype of weights, inputs and targets: float64 with ``trainer.float64`` (its
    rounding, ~1e-16, is what lets two computation orders be compared tightly), else
    float32."""
    return torch.float64 if tcfg.get("float64") else torch.float32


def widen(tensor: torch.Tensor) -> torch.Tensor:
    """A bf16 or fp16 output of autocast in float32; float32 and float64 unchanged (a loss
    is never computed in less than float32, nor in less than the stage's own dtype)."""
    return tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor


def uses_amp(tcfg, device: torch.device) -> bool:
    """bf16 autocast: on CUDA with ``trainer.amp``, never in float64."""
    return device.type == "cuda" and bool(tcfg.get("amp")) and not tcfg.get("float64")


def uses_tf32(tcfg, device: torch.device) -> bool:
    """TF32 matrix products: on CUDA with ``trainer.tf32``, never in float64."""
    return device.type == "cuda" and bool(tcfg.get("tf32")) and not tcfg.get("float64")


def resolved_precision(tcfg, device: torch.device) -> str:
    """What a stage really computes in, as its key holds it: fp64 | fp32 | tf32 |
    bf16-autocast | bf16-autocast+tf32 (switches that do nothing on ``device`` resolved
    away, so flipping them does not split the cache)."""
    if tcfg.get("float64"):
        return "fp64"
    tf32 = uses_tf32(tcfg, device)
    if uses_amp(tcfg, device):
        return "bf16-autocast+tf32" if tf32 else "bf16-autocast"
    return "tf32" if tf32 else "fp32"


def on_gpu(device) -> bool:
    """Whether ``device`` asks for a GPU (auto: when this machine has one)."""
    return str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())
