"""Compression figures: parameters, size on disk, and inference latency of teacher and
student measured side by side in one process, with the spread that says how many
digits of a speed-up mean something."""

from __future__ import annotations

import io
import math
import statistics
import time

import torch
from torch import nn

from kdrun.models import count_params

BATCHES = (1, 256)  # the batch sizes timed: latency_ms_b1, latency_ms_b256


class AllOf(nn.Module):
    """Several models run one after another on the same input (an ensemble's cost)."""

    def __init__(self, models):
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, x):
        return [m(x) for m in self.models]


def size_on_disk_mb(model: nn.Module) -> float:
    """MB (1e6 bytes) of the model's state dict as torch.save writes it."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes / 1e6


def model_figures(model: nn.Module) -> dict:
    return {"params": count_params(model), "size_mb": round(size_on_disk_mb(model), 4)}


def interleaved_latency(models: dict[str, nn.Module], input_shape, device, batch: int,
                        repeats: int, warmup: int) -> dict[str, list[float]]:
    """Per model, ``repeats`` wall times (ms) of one eval-mode forward pass on ``batch``
    inputs. Each round times every model once, in turn, so the machine's drift (other
    processes, clock changes) hits them alike; the first ``warmup`` rounds are dropped."""
    x = torch.randn(batch, *input_shape, device=device)
    times = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model.to(device).eval()
        for i in range(warmup + repeats):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= warmup:
                    times[name].append((time.perf_counter() - t0) * 1000)
    return times


def speedup(teacher_ms: list[float], student_ms: list[float]) -> float:
    """Median of the per-round ratios, rounded to the digits their spread supports."""
    ratios = sorted(t / s for t, s in zip(teacher_ms, student_ms))
    return round_to_spread(statistics.median(ratios), _half_iqr(ratios))


def round_to_spread(value: float, spread: float) -> float:
    """``value`` rounded at the first significant digit of ``spread`` (2.8349 with a
    spread of 0.12 -> 2.8), at most 3 decimals; one significant digit at least."""
    if spread <= 0 or not math.isfinite(spread):
        return round(value, 3)
    decimals = min(3, max(0, -math.floor(math.log10(spread))))
    return round(value, decimals)


def _half_iqr(values: list[float]) -> float:
    if len(values) < 4:
        return float("nan")
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / 2


def compare_with_teacher(rows: list[dict], teacher: nn.Module | None, student: nn.Module,
                         input_shape, device, latency_cfg) -> None:
    """Add latency columns to every row, and each student row's compression (teacher
    params / its params) and speed-up at batch 1 and 256, in place. Teacher and student
    are timed now, side by side; every student row shares the one student timing (they
    share an architecture)."""
    models = {"student": student} if teacher is None else {"teacher": teacher, "student": student}
    for batch in BATCHES:
        times = interleaved_latency(models, input_shape, device, batch,
                                    latency_cfg[f"repeats_b{batch}"], latency_cfg.warmup)
        medians = {name: round(statistics.median(t), 4) for name, t in times.items()}
        ratio = speedup(times["teacher"], times["student"]) if teacher is not None else None
        for row in rows:
            is_teacher = row["role"].startswith("teacher")
            if is_teacher and row["role"] != "teacher":
                continue  # an ensemble member: the ensemble as a whole is timed
            row[f"latency_ms_b{batch}"] = medians["teacher" if is_teacher else "student"]
            if ratio is not None and not is_teacher:
                row[f"speedup_b{batch}"] = ratio
    teacher_row = next((r for r in rows if r["role"] == "teacher"), None)
    for row in rows:
        if teacher_row is not None and not row["role"].startswith("teacher"):
            row["compression"] = round(teacher_row["params"] / row["params"], 3)
