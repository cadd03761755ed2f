"""Compression figures: parameters, size on disk, and inference latency of teacher and
student measured side by side in one process, with the spread that says how many
digits of a speed-up mean something."""

from __future__ import annotations

import io
import math
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from kdrun.models import count_params, example_inputs
from kdrun.models.quantize import is_int8

BATCHES = (1, 256)  # the batch sizes timed: latency_ms_b1, latency_ms_b256
# Timing rounds agree when the median per-round ratio is within this factor of the ratio
# of the two models' fastest rounds (each undisturbed), and the middle half of the
# rounds' ratios within it of each other. A busy machine breaks that (another torch
# process made one teacher forward pass 300x slower than the student's while the
# student's stayed fast); kdrun then times again, up to TRIES times, and otherwise
# prints the figure as unreliable.
AGREEMENT = 1.5
TRIES = 3


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
                        repeats: int, warmup: int,
                        shapes: dict | None = None) -> dict[str, list[float]]:
    """Per model, ``repeats`` wall times (ms) of one eval-mode forward pass on ``batch``
    inputs (of ``shapes[name]`` where given: a teacher reading another view). Each round
    times every model once, in turn, so the machine's drift (other processes, clock
    changes) hits them alike; the first ``warmup`` rounds are dropped."""
    shared = {}  # models that read inputs of one shape read the same ones
    inputs = {}
    for name, model in models.items():
        # a language model draws its own token ids (a teacher with its own tokenizer reads
        # other ids, and windows of the same text in more positions), a GNN its node ids
        if hasattr(model, "example_inputs"):
            inputs[name] = model.example_inputs(batch, device)
            continue
        shape = tuple((shapes or {}).get(name, input_shape))
        if shape not in shared:
            shared[shape] = example_inputs(model, batch, shape, device)
        inputs[name] = shared[shape]
    times = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():  # timed as deployed: float32, whatever it trained in
            if not is_int8(model):  # an int8 model is what it is, on the CPU
                model.to(device, torch.float32)
            model.eval()
        for i in range(warmup + repeats):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(inputs[name])
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= warmup:
                    times[name].append((time.perf_counter() - t0) * 1000)
    return times


def rounds_agree(teacher_ms: list[float], student_ms: list[float]) -> bool:
    """Whether the timing rounds tell one story (see AGREEMENT)."""
    ratios = sorted(t / s for t, s in zip(teacher_ms, student_ms))
    median, fastest = statistics.median(ratios), min(teacher_ms) / min(student_ms)
    if max(median, fastest) / min(median, fastest) > AGREEMENT:
        return False
    if len(ratios) < 4:
        return True
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return q3 / q1 <= AGREEMENT


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


@dataclass(frozen=True)
class Timing:
    """Teacher and student timed side by side: ``latency_ms[who][batch]``, the median
    forward time of who = teacher / student; ``speedup[batch]``, the median per-round
    teacher/student ratio; ``reliable[batch]``, whether the rounds agreed (see
    AGREEMENT), and ``ratios[batch]``, the lowest and highest round's ratio. Without a
    teacher, only the student's latency."""

    latency_ms: dict
    speedup: dict
    reliable: dict
    ratios: dict


# side_by_side's figures in this process, by the two architectures, input, device and
# repeats: a sweep's jobs (one process with the basic or batched launcher) time each
# pair of architectures once. Latency depends on the architecture, not on the weights.
_TIMED: dict[tuple, Timing] = {}


def side_by_side(teacher: nn.Module | None, student: nn.Module, input_shape, device,
                 latency_cfg, int8: nn.Module | None = None, teacher_shape=None) -> Timing:
    """Teacher and student (and the student's ``int8`` model, when the run has one) timed
    side by side in this process, at each batch size in BATCHES, timed again (up to TRIES
    times) while the teacher's and the student's rounds disagree. Every student row of a
    run shares this: they share an architecture."""
    teacher_shape = tuple(teacher_shape or input_shape)
    key = (repr(teacher), repr(student), repr(int8), tuple(input_shape), teacher_shape,
           str(device), tuple(latency_cfg[k] for k in ("repeats_b1", "repeats_b256", "warmup")))
    if key not in _TIMED:
        _TIMED[key] = _time_side_by_side(teacher, student, input_shape, device, latency_cfg,
                                         int8, teacher_shape)
    return _TIMED[key]


def _time_side_by_side(teacher, student, input_shape, device, latency_cfg, int8=None,
                       teacher_shape=None) -> Timing:
    models = {"student": student} if teacher is None else {"teacher": teacher, "student": student}
    if int8 is not None:
        models["int8"] = int8
    latency_ms = {name: {} for name in models}
    speedups, reliable, ratios = {}, {}, {}
    for batch in BATCHES:
        for _ in range(TRIES):
            times = interleaved_latency(models, input_shape, device, batch,
                                        latency_cfg[f"repeats_b{batch}"], latency_cfg.warmup,
                                        {"teacher": teacher_shape or input_shape})
            agree = teacher is None or rounds_agree(times["teacher"], times["student"])
            if agree:
                break
        for name, t in times.items():
            latency_ms[name][batch] = round(statistics.median(t), 4)
        if teacher is not None:
            speedups[batch] = speedup(times["teacher"], times["student"])
            reliable[batch] = agree
            per_round = [t / s for t, s in zip(times["teacher"], times["student"])]
            ratios[batch] = (min(per_round), max(per_round))
    return Timing(latency_ms, speedups, reliable, ratios)
