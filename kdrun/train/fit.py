"""fit() and evaluate(): the training loop every stage shares.

Data sits in memory as tensors; batches are indexed from a seed-determined
permutation, so two fits with the same seed see the same batches in the same
order. fit() knows nothing about files: it hands each epoch's metric rows to a
callback.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kdrun import distributed
from kdrun.data import Data, Split
from kdrun.data.labels import UNLABELED
from kdrun.data.metrics import ACCURACY, Metric
from kdrun.errors import TrainingDiverged
from kdrun.losses.base import DistillationLoss
from kdrun.models import eval_mode
from kdrun.precision import uses_amp, uses_tf32, widen, working_dtype
from kdrun.train.features import FeatureTap, each_feature, feature_shape
from kdrun.train.progress import StageProgress
from kdrun.train.tokens import feature_rows, token_rows

log = logging.getLogger("kdrun")
# The augmentation draws of a fit seeded with s come from s + this, not s: they must not
# repeat the batch-order draws of the same seed.
AUGMENT_SEED_OFFSET = 1


@dataclass
class FitResult:
    stage: str
    seed: int
    epochs: int
    best_epoch: int  # epoch with the highest validation accuracy (first on ties); the last
    # epoch when there is no validation split
    val_acc_best: float  # NaN when there is no validation split
    test_acc_last: float
    test_acc_best_val: float  # test accuracy at best_epoch: selected on val, never on test
    train_seconds: float
    best_state: dict = field(repr=False)  # weights at best_epoch; the model keeps the last ones
    optimizer_state: dict = field(repr=False)
    generated: int | None = None  # inputs a generator made for it (a data-free stage)


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


def predict_logits(model: nn.Module, x, batch_size: int) -> torch.Tensor:
    """Logits for every row of a tensor, or every example of a split in order, in eval
    mode (dropout off, batchnorm frozen)."""
    inputs = x.split(batch_size) if torch.is_tensor(x) else (b for _, b, _ in x.batches(batch_size))
    out, start = None, 0
    with eval_mode(model):
        for xb in inputs:  # into one tensor: never the parts and their concatenation at once
            part = model(xb)
            if out is None:
                out = part.new_empty((len(x), *part.shape[1:]))
            out[start:start + len(part)] = part
            start += len(part)
    return out if out is not None else torch.empty(0)


def evaluate(model: nn.Module, split: Split, batch_size: int,
             metric: Metric = ACCURACY) -> tuple[float, float]:
    """(cross-entropy loss, the task's metric) on a split, in eval mode; with several
    processes each predicts its shard of the split (every process must call it)."""
    logits = on_shards(lambda rows: predict_logits(model, rows, batch_size), split)
    logits, labels = token_rows(logits, split.y.to(logits.device))
    loss = F.cross_entropy(logits, labels).item()
    return loss, metric.compute(logits, labels)


def on_shards(compute, split):
    """``compute(split)``, each process computing its shard of the rows of an in-memory
    split (its result a tensor, or a list of tensors, with a row per example), put back
    together on every process; a split read from disk is computed whole by each."""
    world = distributed.world()
    if not world.parallel or not getattr(split, "in_memory", False):
        return compute(split)
    here = world.shard(len(split))
    part = compute(Split(split.x[here], split.y[here]))
    return each_feature(lambda rows: distributed.gather_rows(rows, len(split)), part)


class CachedLogits:
    """Teacher logits computed once for the whole training set, looked up by index; and,
    for a loss that reads them, the teacher's features at its layer (a tensor, or a list
    of tensors for a list of layers), computed once alike."""

    def __init__(self, logits: torch.Tensor, features=None):
        self.logits, self.features = logits, features

    def to(self, device, dtype: torch.dtype | None = None) -> CachedLogits:
        features = self.features
        if features is not None:
            features = each_feature(lambda f: f.to(device, dtype), features)
        return CachedLogits(self.logits.to(device, dtype), features)

    def feature_shape(self, input_shape=None):
        """The shape (without batch) of the cached features; a list for a list of layers."""
        return each_feature(lambda f: tuple(f.shape[1:]), self.features)

    def __call__(self, idx: torch.Tensor, x: torch.Tensor):
        if self.features is None:
            return self.logits[idx], None
        return self.logits[idx], each_feature(lambda f: f[idx], self.features)


class LiveTeacher:
    """The teacher run on each training batch (in eval mode, without gradients): needed
    when the batch is augmented, so teacher and student see the same view, and when a
    loss reads the teacher's intermediate ``layer``."""

    def __init__(self, model: nn.Module, autocast, layer: str | None = None):
        self.model, self.autocast, self.layer = model.eval(), autocast, layer
        self.tap = FeatureTap(model, layer, "loss.teacher_layer") if layer else None

    def feature_shape(self, input_shape):
        """The shape (without batch) of the teacher's feature at its layer."""
        return feature_shape(self.model, self.layer, input_shape, "loss.teacher_layer")

    def to(self, device, dtype: torch.dtype | None = None) -> LiveTeacher:
        self.model.to(device, dtype)
        return self

    @torch.no_grad()
    def __call__(self, idx: torch.Tensor, x: torch.Tensor):
        with self.autocast():
            logits = widen(self.model(x))
        return logits, (self.tap.read_float() if self.tap else None)


class TopKLogits:
    """The teacher's ``k`` largest logits per row (an example, or a language model's
    position), their classes, and one logit ``rest`` for every other class, chosen so
    that the other classes share the teacher's remaining probability evenly: the softmax
    of the rebuilt logits gives each top-k class exactly the teacher's probability, at a
    memory of k x 8 + 4 bytes per row instead of classes x 4.

    Exact at T = 1, the temperature the teacher's probabilities are defined at, so that
    one cached file serves every temperature of a sweep. At another T the loss softens
    the rebuilt logits: the top-k logits are the teacher's own, but the tail is flat
    where the teacher's is not, so the tail's mass at T, and with it the top-k
    probabilities, differ from the full logits' (T > 1 gives a flat tail more mass than
    a spread one; tests/test_pretrained_lms.py measures it, docs/language-models.md says it).
    """

    features = None

    def __init__(self, values: torch.Tensor, indices: torch.Tensor, rest: torch.Tensor,
                 classes: int):
        self.values, self.indices, self.rest, self.classes = values, indices, rest, classes

    def to(self, device, dtype: torch.dtype | None = None) -> TopKLogits:
        return TopKLogits(self.values.to(device, dtype), self.indices.to(device),
                          self.rest.to(device, dtype), self.classes)

    def dense(self, idx) -> torch.Tensor:
        """The rebuilt logits of rows ``idx``, (..., classes)."""
        rest = self.rest[idx]
        logits = rest.unsqueeze(-1).expand(*rest.shape, self.classes).clone()
        return logits.scatter_(-1, self.indices[idx].long(), self.values[idx])

    def __call__(self, idx: torch.Tensor, x: torch.Tensor):
        return self.dense(idx), None

    @property
    def stage_key(self) -> dict:
        """What a distilled stage's key holds about these targets besides the teacher."""
        return {"teacher_topk": self.values.shape[-1]}

    def soft_target_entropy(self, T: float, chunk: int = 256) -> float:
        """The mean entropy of the rebuilt distributions at T, a chunk of rows at a time."""
        from kdrun.losses.kd import soft_target_entropy

        n = len(self.values)
        parts = [soft_target_entropy(self.dense(torch.arange(i, min(i + chunk, n))), T)
                 * (min(i + chunk, n) - i) for i in range(0, n, chunk)]
        return sum(parts) / n


@torch.no_grad()
def predict_topk(model: nn.Module, split, k: int, batch_size: int) -> list[torch.Tensor]:
    """[values, indices (int32), rest] of TopKLogits for every example of a split in order,
    a batch at a time: the full logits of the whole split are never held at once."""
    parts = []
    with eval_mode(model):
        for _, xb, _ in split.batches(batch_size):
            parts.append(topk_targets(widen(model(xb)), k))
    return [torch.cat(column) for column in zip(*parts)]


def topk_targets(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, indices as int32, rest) of ``logits``' rows: ``rest`` is the log of the
    mass outside the top k, spread evenly over the other classes. That log-mass is a
    log-sum-exp over the other logits themselves, never log(1 - kept), which cancels in
    float32 for a confident teacher (a remainder under ~1e-6 came out ~100 % wrong)."""
    top = logits.topk(k, -1)
    others = logits.shape[-1] - k
    outside = logits.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
    return top.values, top.indices.int(), outside - math.log(max(others, 1))


TeacherTargets = CachedLogits | LiveTeacher | TopKLogits


class EpochMeter:
    """Training loss and accuracy of one epoch, kept on the device. A step writes into
    buffers allocated once per epoch: no read from the device, and no small tensor
    kept per step (thousands of those fragment the CPU heap and inflate memory)."""

    def __init__(self, steps: int, device, count_labels: bool = False,
                 dtype: torch.dtype = torch.float32):
        self.losses = torch.zeros(steps, device=device, dtype=dtype)  # float64 with the model
        self.sizes = [0] * steps  # examples per step; 0 for a skipped step
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        # labelled examples seen, counted only when some are UNLABELED (a transfer set)
        self.labeled = torch.zeros((), dtype=torch.long, device=device) if count_labels else None

    def add(self, step: int, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor):
        """Record training step ``step`` (counted from 1)."""
        self.losses[step - 1] = loss.detach()
        self.sizes[step - 1] = len(labels)
        self.correct += (logits.detach().argmax(1) == labels).sum()  # never UNLABELED
        if self.labeled is not None:
            self.labeled += (labels != UNLABELED).sum()

    def result(self) -> tuple[float, float, int]:
        """(mean loss per example, accuracy in percent on the labelled examples, first
        step whose loss was NaN or infinite; 0 when none was), over every process's
        shards when there are several."""
        sizes = torch.tensor(self.sizes, dtype=self.losses.dtype, device=self.losses.device)
        bad = (~torch.isfinite(self.losses)).nonzero()
        first_bad = int(bad[0]) + 1 if len(bad) else 0
        total = self.correct.new_tensor(sum(self.sizes))  # exact: a count of token rows too
        labeled = total if self.labeled is None else self.labeled
        sums = torch.stack([(self.losses * sizes).sum().double(), total.double(),
                            self.correct.double(), labeled.double()])
        if distributed.world().parallel:  # the first bad step of any process
            sums = distributed.over_processes(sums)
            never = len(self.sizes) + 1
            first = int(distributed.over_processes(self.correct.new_tensor(first_bad or never),
                                                   op="min"))
            first_bad = 0 if first == never else first
        loss_sum, total, correct, labeled = sums.tolist()
        if total == 0:
            return math.nan, 0.0, 0
        acc = correct / labeled * 100 if labeled else math.nan
        return loss_sum / total, acc, first_bad


def configure_device(tcfg, device: torch.device):
    """Backend switches for CUDA (TF32, cuDNN autotuning); returns the autocast
    context to train under (bf16 on CUDA when ``amp``, a no-op elsewhere and in
    float64)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = uses_tf32(tcfg, device)
        torch.backends.cudnn.allow_tf32 = uses_tf32(tcfg, device)
        torch.backends.cudnn.benchmark = bool(tcfg.get("cudnn_benchmark"))
    if uses_amp(tcfg, device):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext  # a disabled autocast still costs a context per step


def prepare_model(model: nn.Module, tcfg, device: torch.device) -> nn.Module:
    """Move to the device (in the stage's dtype); channels-last for 2-D convnets on CUDA;
    optionally compile. Returns the module to call (compiled or not); ``model`` keeps the
    weights."""
    model.to(device, working_dtype(tcfg))
    convs_2d = any(isinstance(m, nn.Conv2d) for m in model.modules())
    if device.type == "cuda" and tcfg.get("channels_last") and convs_2d:
        model.to(memory_format=torch.channels_last)
    return torch.compile(model) if tcfg.get("compile") else model


def fit(
    model: nn.Module,
    data: Data,
    loss_fn: DistillationLoss,
    tcfg,
    *,
    stage: str,
    epochs: int,
    seed: int,
    device: torch.device,
    teacher: TeacherTargets | None = None,
    augment=None,
    resume: dict | None = None,
    on_epoch: Callable[[list[dict], Callable[[], dict]], None] = lambda rows, snapshot: None,
    progress: bool = True,
    label: str | None = None,
) -> FitResult:
    """Train ``model`` in place for ``epochs`` epochs and evaluate it after each.

    ``teacher(idx, x)`` gives the teacher's logits for the batch of training
    examples ``idx`` whose (possibly augmented) inputs are ``x``. ``augment(x,
    generator)`` transforms a batch on the device. ``seed`` fixes the batch order,
    the augmentation draws and the dropout masks.

    After each epoch ``on_epoch(rows, snapshot)`` gets that epoch's metric rows and
    a function returning the full training state (weights, optimiser, schedule,
    RNGs, best-so-far); passing such a state back as ``resume`` continues where
    it left off, ending exactly where an uninterrupted fit would. ``progress`` shows
    the epochs as they pass (kdrun/train/progress.py), named ``label`` (default: ``stage``).
    """
    torch.manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    augment_rng = torch.Generator().manual_seed(seed + AUGMENT_SEED_OFFSET)
    autocast = configure_device(tcfg, device)
    dtype = working_dtype(tcfg)
    train = data.train.to(device, dtype)
    rewrites = getattr(teacher, "rewrites", False)  # on-policy: unlabelled text of the student's
    labelled_only = not (rewrites or bool((train.y == UNLABELED).any()))  # False: a transfer set
    teacher = teacher.to(device, dtype) if teacher is not None else None
    splits = {"val": data.val.to(device, dtype), "test": data.test.to(device, dtype)}
    if not len(splits["val"]):  # no validation split: the last epoch is the selected one
        del splits["val"]
    forward = prepare_model(model, tcfg, device)
    loss_fn.to(device, dtype)  # learned parts of a loss (a FitNet regressor) train with the model
    loss_fn.all_labelled = labelled_only  # else its hard-label term is masked
    loss_fn.chunk_rows = tcfg.get("loss_chunk_rows") if loss_fn.chunks_rows else None
    if loss_fn.reads_indices:
        loss_fn.set_examples(train.y)
    student_tap = FeatureTap(model, loss_fn.student_layer, "loss.student_layer") \
        if loss_fn.reads_features else None
    params = [*model.parameters(), *loss_fn.parameters()]
    optimizer = make_optimizer(params, tcfg, device)
    world = distributed.world()
    schedule = make_schedule(optimizer, tcfg, epochs)
    parts = {"model": model, "loss": loss_fn, "optimizer": optimizer, "schedule": schedule}
    draws = {"order_rng": order, "augment_rng": augment_rng}
    progress_state = new_progress(data.metric)
    if resume is not None:
        progress_state = restore_training(resume, parts, draws)
    best = progress_state["best"]

    def snapshot() -> dict:
        return training_state(progress_state, parts, draws)

    skip_nan = tcfg.get("on_nan", "stop") == "skip"
    bar = StageProgress(label or stage, epochs, progress_state["epoch"], progress, data.metric)
    for epoch in range(progress_state["epoch"] + 1, epochs + 1):
        model.train()
        loss_fn.start_epoch(epoch)  # e.g. DKD's warm-up
        lr = optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        steps = math.ceil(len(train) / tcfg.batch_size)
        meter, skipped = EpochMeter(steps, device, not labelled_only, dtype), 0
        for step, (idx, xb, yb) in enumerate(train.batches(tcfg.batch_size, order), start=1):
            if augment is not None:
                xb = augment(xb, augment_rng)
            if rewrites:
                xb, yb = teacher.rewrite(model, xb, yb, augment_rng)
            batch_rows = len(idx)
            if world.parallel:  # every process drew the same global batch: take this one's shard
                here = world.shard(batch_rows)
                idx, xb, yb = idx[here], xb[here], yb[here]
                if not len(idx):  # a last batch shorter than the processes: none here
                    if not skip_nan or finite_everywhere(torch.zeros((), device=device)):
                        optimizer.zero_grad(set_to_none=True)
                        optimizer_step(optimizer, params, batch_rows, tcfg, model)
                    continue
            t_logits, t_feature = (None, None) if teacher is None else teacher(idx, xb)
            if loss_fn.reads_indices:
                loss_fn.set_batch(idx)
            with autocast():
                logits = forward(xb)
            s_feature = student_tap.read_float() if student_tap else None
            logits, yb_rows = token_rows(logits, yb)  # a language model's positions as rows
            t_logits = token_rows(t_logits, yb)[0]
            s_feature, t_feature = feature_rows(s_feature, yb), feature_rows(t_feature, yb)
            loss = loss_fn(widen(logits), t_logits, yb_rows, s_feature, t_feature)
            if skip_nan and not finite_everywhere(loss):  # reading the flag syncs: on request
                skipped += 1
                continue
            optimizer.zero_grad(set_to_none=True)
            share = len(idx) / batch_rows  # this shard's part of the batch; 1 for one process
            (loss if share == 1 else loss * share).backward()
            optimizer_step(optimizer, params, batch_rows, tcfg, model)
            meter.add(step, loss, logits, yb_rows)
        if schedule is not None:
            schedule.step()
        distributed.share_buffers(model)  # rank 0's batch-norm statistics, as DDP keeps them
        if device.type == "cuda":
            torch.cuda.synchronize()  # kernels run asynchronously: time them, not their launch
        train_loss, train_acc, first_bad = meter.result()
        seconds = time.perf_counter() - t0
        if first_bad:
            raise TrainingDiverged(
                f"{stage} stage diverged at epoch {epoch}, step {first_bad}: the loss "
                f"became NaN or infinite at lr {lr:g}, most likely from too high a learning rate "
                f"or exploding gradients; lower trainer.lr, set trainer.grad_clip, or set "
                f"trainer.on_nan=skip to skip such batches")
        if skipped:
            log.warning("%s epoch %d: skipped %d batches whose loss was NaN or infinite "
                        "(trainer.on_nan=skip)", stage, epoch, skipped)
        rows = [metric_row(stage, epoch, "train", train_loss, train_acc, lr, seconds)]
        for name, split in splits.items():
            split_loss, split_acc = evaluate(model, split, tcfg.eval_batch_size, data.metric)
            rows.append(metric_row(stage, epoch, name, split_loss, split_acc, lr, seconds))
        val_acc = record_epoch(progress_state, epoch, rows, seconds, lambda: {
            k: v.detach().clone() for k, v in model.state_dict().items()}, data.metric)
        on_epoch(rows, snapshot)
        bar.update(epoch, train_loss, val_acc)
    bar.close()
    if student_tap:
        student_tap.remove()
    return FitResult(
        stage=stage, seed=seed, epochs=epochs, best_epoch=best["epoch"], val_acc_best=best["val"],
        test_acc_last=progress_state["test_last"], test_acc_best_val=best["test"],
        train_seconds=progress_state["seconds"], best_state=best["state"],
        optimizer_state=optimizer.state_dict(),
    )


def optimizer_step(optimizer, params, batch_rows: int, tcfg, model: nn.Module) -> None:
    """The optimiser's step, on the gradients summed over the processes when there are
    several, clipped when ``trainer.grad_clip`` says so."""
    distributed.sum_gradients(params, batch_rows)
    if tcfg.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
    optimizer.step()


def finite_everywhere(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (all skip a batch, or none does)."""
    bad = (~torch.isfinite(loss.detach())).to(torch.int32)
    return not int(distributed.over_processes(bad, op="max"))


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
    by_split = {row["split"]: row["acc"] for row in rows}
    val_acc, test_acc = by_split.get("val", float("nan")), by_split["test"]
    best = progress["best"]
    if metric.better(val_acc, best["val"]) or "val" not in by_split:
        best.update(epoch=epoch, val=val_acc, test=test_acc, state=weights())
    progress.update(epoch=epoch, test_last=test_acc, seconds=progress["seconds"] + seconds)
    return val_acc


def metric_row(stage, epoch, split, loss, acc, lr, seconds) -> dict:
    return {"stage": stage, "epoch": epoch, "split": split, "loss": loss, "acc": acc,
            "lr": lr, "seconds": seconds}
