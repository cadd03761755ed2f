"""Compression figures of a trained model: parameters, size on disk, inference latency,
and each student's compression and speed-up against its teacher."""

from __future__ import annotations

import io
import statistics
import time

import torch
from torch import nn

from kdrun.models import count_params, eval_mode


def size_on_disk_mb(model: nn.Module) -> float:
    """MB (1e6 bytes) of the model's state dict as torch.save writes it."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes / 1e6


def latency_ms(model: nn.Module, input_shape, device, batch: int = 1, repeats: int = 30) -> float:
    """Median wall time of one eval-mode forward pass on ``batch`` inputs, in ms."""
    x = torch.randn(batch, *input_shape, device=device)
    times = []
    with eval_mode(model.to(device)):
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 3:  # the first calls warm caches up
                times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def model_figures(model: nn.Module, input_shape, device) -> dict:
    return {
        "params": count_params(model),
        "size_mb": round(size_on_disk_mb(model), 4),
        "latency_ms_b1": round(latency_ms(model, input_shape, device, 1), 4),
        "latency_ms_b256": round(latency_ms(model, input_shape, device, 256, repeats=5), 4),
    }


def against_teacher(rows: list[dict]) -> None:
    """Add each student row's compression (teacher params / its params) and speed-up
    (teacher latency / its latency, at batch 1 and 256), in place."""
    teacher = next((r for r in rows if r["role"] == "teacher"), None)
    if teacher is None:  # e.g. deep mutual learning: students only
        return
    for row in rows:
        if row["role"] != "teacher":
            row["compression"] = round(teacher["params"] / row["params"], 3)
            for b in ("b1", "b256"):
                row[f"speedup_{b}"] = round(teacher[f"latency_ms_{b}"] / row[f"latency_ms_{b}"], 3)
