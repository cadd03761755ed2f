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
        for model in models.values():  # timed as deployed: float32, whatever it trained in
            model.to(device, torch.float32).eval()
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


# side_by_side's figures in this process, by the two architectures, input, device and
# repeats: a sweep's jobs (one process with the basic or batched launcher) time each
# pair of architectures once. Latency depends on the architecture, not on the weights.
_TIMED: dict[tuple, tuple[dict, dict]] = {}


def side_by_side(teacher: nn.Module | None, student: nn.Module, input_shape, device,
                 latency_cfg) -> tuple[dict, dict]:
    """Teacher and student timed side by side in this process, at each batch size in
    BATCHES: ``latency_ms[who][batch]``, the median forward time of who = teacher /
    student, and ``speedup[batch]``, the median per-round teacher/student ratio (empty
    without a teacher). Every student row of a run shares these: they share an
    architecture."""
    key = (repr(teacher), repr(student), tuple(input_shape), str(device),
           tuple(latency_cfg[k] for k in ("repeats_b1", "repeats_b256", "warmup")))
    if key not in _TIMED:
        _TIMED[key] = _time_side_by_side(teacher, student, input_shape, device, latency_cfg)
    latency_ms, speedup = _TIMED[key]
    return {who: dict(ms) for who, ms in latency_ms.items()}, dict(speedup)


def _time_side_by_side(teacher, student, input_shape, device, latency_cfg):
    models = {"student": student} if teacher is None else {"teacher": teacher, "student": student}
    latency_ms = {name: {} for name in models}
    speedups = {}
    for batch in BATCHES:
        times = interleaved_latency(models, input_shape, device, batch,
                                    latency_cfg[f"repeats_b{batch}"], latency_cfg.warmup)
        for name, t in times.items():
            latency_ms[name][batch] = round(statistics.median(t), 4)
        if teacher is not None:
            speedups[batch] = speedup(times["teacher"], times["student"])
    return latency_ms, speedups
