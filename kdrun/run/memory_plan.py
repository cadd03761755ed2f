"""The memory a run will need, planned before anything trains, from the models built on
the meta device (no memory, nothing read), the data and the device's free memory.

The plan answers "will the teacher and the student fit?" before an allocation fails
minutes into a run: per training stage the weights, gradients, optimiser state, the copy
of the best weights, the activations one batch keeps for the backward pass (counted by
running the model on the meta device and adding up what autograd saves), the logits of a
batch and the loss's copies of them; the teacher-target cache; evaluation's logits of a
whole split. The peak is the process's resident memory now plus its largest phase. Where
the full logit cache would take more than ``trainer.memory_share`` of the free memory,
left beside the run's other needs, the run caches the teacher's top-``trainer.auto_topk``
logits per row instead and says
so (``teacher_cache=auto``), or refuses in one line (``teacher_cache=full``); a batch
that cannot fit at all is refused in one line naming the knobs that shrink it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from kdrun.data import Data
from kdrun.errors import ConfigError
from kdrun.losses import loss_class
from kdrun.models import example_inputs, meta_architecture
from kdrun.precision import working_dtype
from kdrun.run.schemes import scheme_of

log = logging.getLogger("kdrun")
GB = 1e9
# Copies of a batch's (rows x classes) logits alive during a step, beside the model's own
# activations: the logits, their log-softmax and its gradient for a plain cross-entropy;
# for a loss that reads the teacher also the teacher's logits of the batch, both sides
# divided by T, the teacher's log-probabilities and probabilities (kdrun/losses/base.py).
CE_LOGIT_COPIES = 3
TAUGHT_LOGIT_COPIES = 8
# Evaluation holds a split's logits, their float32 log-softmax (the loss) and, for
# perplexity, a float64 copy and its log-softmax (kdrun/data/metrics.py): bytes per logit.
EVAL_BYTES_PER_LOGIT = {"accuracy": 8, "perplexity": 24}


@dataclass(frozen=True)
class Phase:
    name: str  # e.g. "distilling the student"
    parts: dict[str, float]  # what it holds beside the process now: name -> bytes

    @property
    def total(self) -> float:
        return sum(self.parts.values())


@dataclass(frozen=True)
class MemoryPlan:
    device: str
    available: float  # bytes free on the device now
    resident: float  # bytes the process holds now (CPU), or the GPU's allocated bytes
    phases: list[Phase]
    targets: str  # what the teacher-target cache holds, in words
    teacher_topk: int | None  # k of the top-k cache the run uses (None: full, or none)

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda phase: phase.total)

    @property
    def peak(self) -> float:
        return self.resident + self.peak_phase.total

    @property
    def line(self) -> str:
        phase = self.peak_phase
        parts = ", ".join(f"{name} {size(b)}" for name, b in phase.parts.items() if b)
        return (f"memory plan ({self.device}, {size(self.available)} free): peak about "
                f"{size(self.peak)} while {phase.name} (the process now {size(self.resident)} "
                f"+ {parts}); teacher targets: {self.targets}")

    def columns(self) -> dict:
        """summary.csv's memory columns: the planned peak and the free memory, in MB."""
        return {"memory_plan_mb": round(self.peak / 1e6, 1),
                "memory_free_mb": round(self.available / 1e6, 1)}


def size(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def free_memory(device: torch.device) -> float:
    """Bytes that can still be allocated: the GPU's free memory, or the system's
    available memory, capped by this process's cgroup limit where there is one."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    free = _meminfo("MemAvailable")
    limit, used = _cgroup("memory.max"), _cgroup("memory.current")
    if limit is not None and used is not None:
        free = min(free, limit - used) if free else limit - used
    return float(free or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def resident_memory(device: torch.device) -> float:
    """Bytes this process holds now: its resident set (CPU), or on a GPU what torch has
    allocated there."""
    if device.type == "cuda":
        return float(torch.cuda.memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _meminfo(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup(name: str) -> int | None:
    try:
        text = Path("/sys/fs/cgroup", name).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def activation_bytes(model: torch.nn.Module, batch: int, input_shape) -> float:
    """The bytes autograd keeps for the backward pass of one training batch: the tensors
    the forward pass saves, counted on the meta device (each once; the weights, which
    are counted apart, left out). Under a fake-tensor mode, which transformers' models
    take for tracing, so that they skip their checks that read values."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    weights = {id(p) for p in model.parameters()}
    saved: dict[int, torch.Tensor] = {}  # kept alive: an id is not reused meanwhile

    def pack(tensor: torch.Tensor):
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in weights and not isinstance(base, torch.nn.Parameter):
            saved[id(base)] = base
        return tensor

    model.train()
    inputs = example_inputs(model, batch, input_shape, torch.device("meta"), torch.float32)
    with FakeTensorMode(allow_non_fake_inputs=True), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(inputs)
    return float(sum(t.numel() * t.element_size() for t in saved.values()))


@dataclass(frozen=True)
class Model:
    """A model's memory figures: its parameters, and a training batch's activations."""

    params: int
    activations: float | None  # None: unknown (its forward cannot run on the meta device)


def model_figures(model_cfg, data: Data, batch: int, dtype: torch.dtype) -> Model | None:
    model = meta_architecture(model_cfg, data.input_shape, data.num_classes)
    if model is None:
        return None
    model.to(dtype)
    params = sum(p.numel() for p in model.parameters())
    try:
        activations = activation_bytes(model, batch, data.input_shape)
    except Exception:  # a probe: a forward that needs real values is left uncounted
        activations = None
    return Model(params, activations)


def optimizer_slots(tcfg) -> int:
    """Tensors the size of the weights the optimiser keeps: Adam's two moments, SGD's
    momentum buffer."""
    if tcfg.optimizer == "sgd":
        return 1 if tcfg.momentum else 0
    return 2


def training_parts(model: Model | None, rows: int, classes: int, width: int, tcfg,
                   taught: bool) -> dict[str, float]:
    """What one model's training step holds: weights, gradients, optimiser state and the
    best weights' copy; a batch's activations; its logits and the loss's copies of them
    (``trainer.loss_chunk_rows`` rows at a time when set)."""
    if model is None:
        return {}
    weights = model.params * width * (3 + optimizer_slots(tcfg))
    chunk = min(rows, tcfg.get("loss_chunk_rows") or rows)
    logits = rows * classes * width + chunk * classes * width * (
        (TAUGHT_LOGIT_COPIES if taught else CE_LOGIT_COPIES) - 1)
    return {"weights, gradients and optimiser state": weights,
            "activations of a batch": model.activations or 0.0,
            "logits and loss": logits}


def plan_memory(cfg: DictConfig, data: Data, device: torch.device) -> MemoryPlan:
    """The run's memory plan, with the teacher targets it decides (see the module's doc);
    a ConfigError where the full cache is forced, or a batch cannot fit, beyond the free
    memory's ``trainer.memory_share`` (null: plan only, decide nothing)."""
    tcfg, scheme = cfg.trainer, scheme_of(cfg)
    dtype = working_dtype(tcfg)
    width = torch.finfo(dtype).bits // 8
    per_row = data.input_shape[0] if data.per_position else 1  # a language model's positions
    rows = tcfg.batch_size * per_row
    classes = data.num_classes
    student = model_figures(cfg.student, data, tcfg.batch_size, dtype)
    teacher = (model_figures(cfg.teacher, data.teacher_data or data, tcfg.batch_size, dtype)
               if scheme.has_teacher and not cfg.teacher.get("checkpoint") else None)
    taught_rows = per_row * (len(data.train) + (data.unlabeled_count if scheme.uses_transfer_set
                                                else 0))
    cached = caches_logits(cfg, data)
    full_cache = taught_rows * classes * width if cached else 0.0
    available, resident = free_memory(device), resident_memory(device)
    biggest = max((split for split in (data.val, data.test)), key=len)
    evaluation = len(biggest) * per_row * classes * EVAL_BYTES_PER_LOGIT.get(
        data.metric.name, 8)
    teacher_weights = teacher.params * width if teacher else 0.0
    # on a GPU the data is moved there for training; on the CPU it is in the process now
    data_part = {"the data on the device": data_bytes(data)} if device.type == "cuda" else {}

    def phases(cache: float) -> list[Phase]:
        return [
            Phase("training the teacher", {
                **training_parts(teacher, rows, classes, width, tcfg, False),
                "evaluation": evaluation, **data_part}),
            Phase("computing the teacher's targets", {
                "the teacher's weights": teacher_weights, "teacher targets": cache,
                "logits of an evaluation batch": 2 * tcfg.eval_batch_size * per_row * classes
                * width if cached else 0.0, **data_part}),
            Phase("distilling the student", {
                **training_parts(student, rows, classes, width, tcfg, True),
                "the teacher's weights": teacher_weights, "teacher targets": cache,
                "evaluation": evaluation, **data_part}),
        ]

    room = available - max(p.total for p in phases(0.0))  # what the cache may take at most
    topk, targets = resolve_targets(cfg, full_cache, taught_rows, classes, width, available,
                                    room)
    phases = phases(topk_bytes(taught_rows, topk, width) if topk else full_cache)
    plan = MemoryPlan(str(device), available, resident, phases, targets, topk)
    check_fits(plan, cfg)
    return plan


def data_bytes(data: Data) -> float:
    """The bytes of the in-memory splits (inputs and targets), the transfer set included."""
    splits = [data.train, data.val, data.test, data.transfer]
    return float(sum(t.numel() * t.element_size() for s in splits
                     if s is not None and getattr(s, "in_memory", False) for t in (s.x, s.y)))


def caches_logits(cfg: DictConfig, data: Data) -> bool:
    """Whether the distilled student learns from the teacher's logits cached on the
    training set (as kdrun/train/targets.py: choose_targets decides)."""
    scheme = scheme_of(cfg)
    if not (scheme.has_teacher and scheme.caches_teacher_logits):
        return False
    loss = loss_class(scheme.distillation_loss(cfg))
    return bool(loss.needs_teacher and not loss.reads_features
                and getattr(data.train, "in_memory", False)
                and not cfg.dataset.get("augment") and cfg.trainer.cache_teacher_logits)


def topk_bytes(rows: int, k: int, width: int) -> float:
    """A top-k cache: k values and int32 indices per row, and the rest's logit."""
    return rows * (k * (width + 4) + width)


def resolve_targets(cfg: DictConfig, full_cache: float, rows: int, classes: int, width: int,
                    available: float, room: float) -> tuple[int | None, str]:
    """(k of the top-k cache, or None for the full logits; the targets in words): every
    logit while they take at most ``trainer.memory_share`` of the ``room`` the rest of
    the run leaves free (a margin for what no plan counts: the allocator's slack, other
    processes)."""
    tcfg = cfg.trainer
    if not full_cache:
        return None, "none cached (a live teacher, or no teacher)"
    asked = tcfg.get("teacher_topk")
    if asked and asked < classes:
        return asked, f"top-{asked} logits per row, {size(topk_bytes(rows, asked, width))}"
    share = tcfg.get("memory_share")
    if share is None or full_cache <= share * room:
        return None, f"every logit, {size(full_cache)}"
    k = tcfg.get("auto_topk")
    room = (f"over trainer.memory_share={share:g} of the {size(max(room, 0))} free beside "
            f"the rest of the run")
    if tcfg.get("teacher_cache") == "full" or not k or k >= classes:
        raise ConfigError("trainer.teacher_cache", tcfg.get("teacher_cache"),
                          f"the teacher's logits on the training set would take "
                          f"{size(full_cache)} ({rows:,} rows x {classes:,} classes), {room}: "
                          f"set trainer.teacher_cache=auto (caches the top-{k or 64} per row) "
                          f"or trainer.teacher_topk=K, or raise trainer.memory_share")
    log.warning("teacher targets: every logit would take %s (%s rows x %s classes), %s: "
                "caching the teacher's top-%d logits per row instead, %s "
                "(trainer.teacher_cache=auto; trainer.auto_topk sets k)",
                size(full_cache), f"{rows:,}", f"{classes:,}", room, k,
                size(topk_bytes(rows, k, width)))
    return k, (f"top-{k} logits per row, {size(topk_bytes(rows, k, width))} (every logit "
               f"would take {size(full_cache)})")


# The knob that shrinks each part of a phase: (config key, advice).
KNOBS = {
    "activations of a batch": ("trainer.batch_size", "lower trainer.batch_size"),
    "logits and loss": ("trainer.loss_chunk_rows", "set trainer.loss_chunk_rows (the loss a "
                        "chunk of positions at a time) or lower trainer.batch_size"),
    "logits of an evaluation batch": ("trainer.eval_batch_size",
                                      "lower trainer.eval_batch_size"),
    "evaluation": ("dataset.test_fraction", "hold out a smaller test or validation split "
                   "(evaluation keeps a split's logits)"),
    "teacher targets": ("trainer.teacher_topk", "set trainer.teacher_topk"),
    "weights, gradients and optimiser state": ("student", "choose smaller models"),
    "the teacher's weights": ("teacher", "choose a smaller teacher"),
    "the data on the device": ("device", "train on the CPU (device=cpu), or on less data"),
}


def check_fits(plan: MemoryPlan, cfg: DictConfig) -> None:
    """A phase that needs more than the free memory is refused in one line naming the
    knob of its largest part (none while trainer.memory_share is null)."""
    phase = plan.peak_phase
    if cfg.trainer.get("memory_share") is None or phase.total <= plan.available:
        return
    largest = max(phase.parts, key=phase.parts.get)
    key, advice = KNOBS[largest]
    parts = ", ".join(f"{name} {size(b)}" for name, b in phase.parts.items() if b)
    value = OmegaConf.select(cfg, key)
    raise ConfigError(key, value.get("arch") if OmegaConf.is_config(value) else value,
                      f"{phase.name} needs about {size(phase.total)} ({parts}), more than "
                      f"the {size(plan.available)} free on {plan.device}: {advice} "
                      f"(trainer.memory_share=null skips this check)")
