"""fit() and evaluate(): one model's training loop, run by the epoch driver
(kdrun/train/epochs.py) as every loop is.

Data sits in memory as tensors; batches are indexed from a seed-determined
permutation, so two fits with the same seed see the same batches in the same
order. fit() knows nothing about files: it hands each epoch's metric rows to a
callback.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kdrun import distributed
from kdrun.data import Data, Split
from kdrun.data.labels import UNLABELED
from kdrun.data.metrics import ACCURACY, Metric
from kdrun.losses.base import DistillationLoss
from kdrun.precision import uses_amp, uses_tf32, widen, working_dtype
from kdrun.train.epochs import (
    EpochTrained,
    FitResult,
    OptimizerSteps,
    drive,
    restore_training,
    result_of,
    training_state,
)
from kdrun.train.features import FeatureTap
from kdrun.train.optim import make_optimizer, make_schedule
from kdrun.train.progress import StageProgress
from kdrun.train.shards import on_shards
from kdrun.train.targets import TeacherTargets, predict_logits
from kdrun.train.tokens import feature_rows, has_no_loss_rows, kept_rows, token_rows

log = logging.getLogger("kdrun")
# The augmentation draws of a fit seeded with s come from s + this, not s: they must not
# repeat the batch-order draws of the same seed.
AUGMENT_SEED_OFFSET = 1


def evaluate(model: nn.Module, split: Split, batch_size: int,
             metric: Metric = ACCURACY) -> tuple[float, float]:
    """(cross-entropy loss, the task's metric) on a split, in eval mode; with several
    processes each predicts its shard of the split (every process must call it)."""
    logits = on_shards(lambda rows: predict_logits(model, rows, batch_size), split)
    targets = split.y.to(logits.device)
    keep = kept_rows(targets) if has_no_loss_rows(targets) else None  # instruction data
    logits, labels = token_rows(logits, targets, keep)
    loss = F.cross_entropy(logits, labels).item()
    return loss, metric.compute(logits, labels)


def metric_on(model: nn.Module, split: Split, batch_size: int,
              metric: Metric = ACCURACY) -> float:
    """The task's metric of ``model`` on a split; NaN for an empty one (no validation
    split)."""
    return evaluate(model, split, batch_size, metric)[1] if len(split) else float("nan")


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
    loop = SingleModel(model, data, loss_fn, tcfg, stage=stage, epochs=epochs, seed=seed,
                       device=device, teacher=teacher, augment=augment)
    splits = {"val": data.val.to(device, loop.dtype), "test": data.test.to(device, loop.dtype)}
    if not len(splits["val"]):  # no validation split: the last epoch is the selected one
        del splits["val"]
    result = loop.drive(stage=stage, epochs=epochs, seed=seed, splits=splits, device=device,
                        resume=resume, on_epoch=on_epoch, progress=progress, label=label)
    if loop.student_tap:
        loop.student_tap.remove()
    return result


class OneModel:
    """A loop of one model under the epoch driver (kdrun/train/epochs.py): what it gives
    besides its epoch, from its ``model``, the ``parts`` and ``draws`` its state holds,
    its ``optimizer``, ``tcfg`` and ``metric``."""

    size = 1  # models trained together

    def evaluate(self, split) -> list[tuple[float, float]]:
        return [evaluate(self.model, split, self.tcfg.eval_batch_size, self.metric)]

    def weights(self, i: int) -> dict:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def clip(self, max_norm: float) -> None:
        nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def sync(self, rows: int) -> None:
        """One process: nothing to sum (fit's loop sums over several)."""

    def snapshot(self, progress: list[dict]) -> dict:
        return training_state(progress[0], self.parts, self.draws)

    def restore(self, state: dict) -> list[dict]:
        return [restore_training(state, self.parts, self.draws)]

    def drive(self, *, stage: str, epochs: int, seed: int, splits: dict, device, resume,
              on_epoch, progress: bool, label: str | None, generated: int | None = None
              ) -> FitResult:
        """fit's contract: train under the driver; ``on_epoch(rows, snapshot)``."""
        def each_epoch(out, snapshot):
            for _, rows in out:
                on_epoch(rows, snapshot)

        done = drive(self, stages=[stage], epochs=epochs, splits=splits, metric=self.metric,
                     device=device, resume=resume, on_epoch=each_epoch,
                     bar=lambda start: StageProgress(label or stage, epochs, start, progress,
                                                     self.metric))
        return result_of(done[0], stage=stage, seed=seed, epochs=epochs,
                         optimizer_state=self.optimizer.state_dict(), generated=generated)


class SingleModel(OneModel):
    """fit's loop: one model, its loss and optimiser, its seeded batch order and
    augmentation draws, its teacher's targets."""

    def __init__(self, model: nn.Module, data: Data, loss_fn: DistillationLoss, tcfg, *,
                 stage: str, epochs: int, seed: int, device: torch.device,
                 teacher: TeacherTargets | None, augment):
        torch.manual_seed(seed)
        self.order = torch.Generator().manual_seed(seed)
        self.augment_rng = torch.Generator().manual_seed(seed + AUGMENT_SEED_OFFSET)
        self.autocast = configure_device(tcfg, device)
        self.dtype = working_dtype(tcfg)
        self.train = data.train.to(device, self.dtype)
        # on-policy: unlabelled text of the student's; a transfer set: unlabelled examples
        self.rewrites = getattr(teacher, "rewrites", False)
        self.labelled_only = not (self.rewrites or bool((self.train.y == UNLABELED).any()))
        self.masked = has_no_loss_rows(self.train.y)  # instruction data: prompts, padding
        self.teacher = teacher.to(device, self.dtype) if teacher is not None else None
        self.model, self.stage, self.tcfg, self.device = model, stage, tcfg, device
        self.metric, self.augment, self.alive = data.metric, augment, [True]
        self.forward = prepare_model(model, tcfg, device)
        self.loss_fn = loss_fn.to(device, self.dtype)  # learned parts train with the model
        loss_fn.all_labelled = self.labelled_only  # else its hard-label term is masked
        loss_fn.chunk_rows = tcfg.get("loss_chunk_rows") if loss_fn.chunks_rows else None
        if loss_fn.reads_indices:
            loss_fn.set_examples(self.train.y)
        self.student_tap = FeatureTap(model, loss_fn.student_layer, "loss.student_layer") \
            if loss_fn.reads_features else None
        self.params = [*model.parameters(), *loss_fn.parameters()]
        self.optimizer = make_optimizer(self.params, tcfg, device)
        self.schedule = make_schedule(self.optimizer, tcfg, epochs,
                                      math.ceil(len(self.train) / tcfg.batch_size))
        self.parts = {"model": model, "loss": loss_fn, "optimizer": self.optimizer,
                      "schedule": self.schedule}
        self.draws = {"order_rng": self.order, "augment_rng": self.augment_rng}
        self.skip_nan = tcfg.get("on_nan", "stop") == "skip"

    def train_epoch(self, epoch: int, steps: OptimizerSteps) -> list[EpochTrained]:
        self.model.train()
        self.loss_fn.start_epoch(epoch)  # e.g. DKD's warm-up
        lr = self.optimizer.param_groups[0]["lr"]
        batches = math.ceil(len(self.train) / self.tcfg.batch_size)
        meter = EpochMeter(batches, self.device, not self.labelled_only, self.dtype)
        skipped = 0
        for step, batch in enumerate(self.train.batches(self.tcfg.batch_size, self.order),
                                     start=1):
            skipped += self.train_step(step, *batch, meter, steps)
        distributed.share_buffers(self.model)  # rank 0's batch-norm statistics, as DDP keeps
        loss, accuracy, first_bad = meter.result()
        failure = None if not first_bad else (
            f"{self.stage} stage diverged at epoch {epoch}, step {first_bad}: the loss "
            f"became NaN or infinite at lr {lr:g}, most likely from too high a learning rate "
            f"or exploding gradients; lower trainer.lr, set trainer.grad_clip, or set "
            f"trainer.on_nan=skip to skip such batches")
        return [EpochTrained(loss, accuracy, failure, skipped)]

    def train_step(self, step: int, idx, xb, yb, meter: EpochMeter,
                   steps: OptimizerSteps) -> int:
        """One batch; returns 1 when it was skipped (a NaN loss, trainer.on_nan=skip)."""
        if self.augment is not None:
            xb = self.augment(xb, self.augment_rng)
        if self.rewrites:
            xb, yb = self.teacher.rewrite(self.model, xb, yb, self.augment_rng)
        batch_rows, world = len(idx), distributed.world()
        if world.parallel:  # every process drew the same global batch: take this one's shard
            here = world.shard(batch_rows)
            idx, xb, yb = idx[here], xb[here], yb[here]
            if not len(idx):  # a last batch shorter than the processes: none here
                if not self.skip_nan or finite_everywhere(torch.zeros((), device=self.device)):
                    steps.backward(None, batch_rows)
                    steps.take(self.optimizer)
                return 0
        loss, logits, labels = self.loss_of(idx, xb, yb)
        if self.skip_nan and not finite_everywhere(loss):  # reading the flag syncs: on request
            return 1
        share = len(idx) / batch_rows  # this shard's part of the batch; 1 for one process
        steps.backward(loss if share == 1 else loss * share, batch_rows)
        steps.take(self.optimizer)
        meter.add(step, loss, logits, labels)
        return 0

    def loss_of(self, idx, xb, yb):
        """The batch's loss, the student's logits and labels as rows (a language model's
        positions are rows)."""
        t_logits, t_feature = (None, None) if self.teacher is None else self.teacher(idx, xb)
        if self.loss_fn.reads_indices:
            self.loss_fn.set_batch(idx)
        with self.autocast():
            logits = self.forward(xb)
        s_feature = self.student_tap.read_float() if self.student_tap else None
        keep = kept_rows(yb) if self.masked else None  # instruction data: the responses'
        logits, labels = token_rows(logits, yb, keep)
        t_logits = token_rows(t_logits, yb, keep)[0]
        s_feature, t_feature = feature_rows(s_feature, yb, keep), feature_rows(t_feature, yb, keep)
        return self.loss_fn(widen(logits), t_logits, labels, s_feature, t_feature), logits, labels

    def sync(self, rows: int) -> None:
        """The gradients summed over the processes when there are several."""
        distributed.sum_gradients(self.params, rows)

def finite_everywhere(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (all skip a batch, or none does)."""
    bad = (~torch.isfinite(loss.detach())).to(torch.int32)
    return not int(distributed.over_processes(bad, op="max"))
