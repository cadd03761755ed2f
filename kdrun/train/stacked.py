"""Many students trained at once as one stacked model (torch.func): the students of a
sweep that differ only in their loss parameters (T, alpha, ...), their seed or their
teacher.

The group runs under the epoch driver every loop shares (kdrun/train/epochs.py: the
schedule, the optimiser's steps and clipping call, the metric rows, each member's best
epoch, resuming, a NaN loss), so those are ``fit``'s by construction. What this module
keeps equal to ``train.fit`` alone, member by member: the same init (the model built
after seeding with its seed), its own seed's batch order and augmentation draws, its own
loss, its own gradient-norm clipping, and an optimiser whose maths is elementwise and so
the same as a separate one per member. Only the floating-point order of the stacked
matrix products differs, so the weights agree with a sequential run's to rounding
(tests/test_batched.py bounds it).

Every member writes the files its stage would write alone: rows.csv each epoch,
result.pt and summary.json at the end, so a sequential run reuses them. The resumable
state is the group's, saved as one file (``train_group``'s ``save_state``): a killed
group resumes as a group.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from kdrun.data import Data
from kdrun.data.augment import make_augment
from kdrun.data.labels import UNLABELED
from kdrun.data.metrics import ACCURACY, Metric
from kdrun.losses.base import DistillationLoss
from kdrun.models import build_model, eval_mode
from kdrun.precision import widen, working_dtype
from kdrun.train.epochs import EpochTrained, FitResult, OptimizerSteps, drive, result_of
from kdrun.train.fit import AUGMENT_SEED_OFFSET, configure_device
from kdrun.train.optim import make_optimizer, make_schedule
from kdrun.train.progress import training
from kdrun.train.stacked_losses import StackedLosses
from kdrun.train.targets import LiveTeacher, TeacherTargets

if TYPE_CHECKING:  # what a member carries for its stage's files, not used here
    from kdrun.run.summary_row import RowContext
    from kdrun.store.cache import StageEntry

log = logging.getLogger("kdrun")


class NotBatchable(Exception):
    """Why a job's students cannot join a stacked group (it then runs on its own)."""


@dataclass
class Member:
    """One student stage to train in a group."""

    entry: StageEntry
    role: str  # scratch | distilled
    seed: int  # the seed that names the stage
    train_seed: int  # the seed it trains with: init, batch order
    model_cfg: DictConfig
    loss: DistillationLoss
    # what it learns from (kdrun/train/targets.py): cached logits, stacked by index, or a
    # teacher run on each member's (augmented) batch; None for a scratch student
    targets: TeacherTargets | None
    teacher_key: str | None  # the stage key of that teacher (members share its targets)
    cfg: DictConfig  # its job's config (stored in its checkpoint)
    context: RowContext  # its job's row context (how it is evaluated, provenance)
    data: Data  # the data it trains on
    device: torch.device


def check_batchable(model: nn.Module, loss: DistillationLoss, tcfg, device) -> None:
    """Raise NotBatchable when a model cannot train in a stacked group (or would train
    slower stacked than alone)."""
    if getattr(model, "outputs_per_token", False):
        raise NotBatchable("it is a language model (not stacked yet)")
    if getattr(model, "reads_graph", False):
        raise NotBatchable("it reads a graph (each batch gathers its own neighbourhood)")
    for module in model.modules():
        if device.type == "cpu" and isinstance(module, (nn.Conv2d, nn.Conv3d)):
            raise NotBatchable("it has 2-D convolutions, which train slower stacked than "
                               "one model at a time on a CPU (benchmarks/bench_stacked.py: "
                               "0.7x on 3x32x32 images; 1-D ones 1.1-1.9x faster); they "
                               "batch on CUDA")
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise NotBatchable("the model has batch norm (stacked, its members drifted from "
                               "themselves trained alone by 1e-3 within an epoch on randomly "
                               "flipped images with one CPU thread, a cause not pinned down "
                               "yet)")
        if isinstance(module, nn.Dropout) and module.p > 0:
            raise NotBatchable("the model has dropout (its masks would differ from a "
                               "sequential run's)")
    if loss.reads_features:
        raise NotBatchable(f"{type(loss).__name__} reads features")
    if tcfg.compile:
        raise NotBatchable("trainer.compile=true")
    if tcfg.get("loss_chunk_rows"):
        raise NotBatchable("trainer.loss_chunk_rows (a loss in chunks of rows is computed for "
                           "one student at a time)")
    if tcfg.on_nan != "stop":
        raise NotBatchable("trainer.on_nan=skip (a skipped step is per student)")
    if any(True for _ in loss.parameters()):
        raise NotBatchable(f"{type(loss).__name__} has learned parameters")


def train_group(members: list[Member], data: Data, tcfg, epochs: int, device: torch.device,
                on_epoch: Callable[[Member, list[dict]], None],
                on_failure: Callable[[Member, str], None],
                resume: dict | None = None,
                save_state: Callable[[dict], None] | None = None,
                ) -> list[tuple[nn.Module, FitResult] | None]:
    """Train ``members`` as one stacked model, from the start or from ``resume`` (a
    ``save_state`` argument of an earlier run of the same members). ``on_epoch`` gets
    each member's metric rows after every epoch; then ``save_state``, every
    ``trainer.checkpoint_every`` epochs, the group's resumable state. Returns each
    member's trained model (its last weights) and FitResult, or None for a member whose
    loss became NaN or infinite (``on_failure`` is told; its stage is left unfinished)."""
    group = _StackedGroup(members, data, tcfg, epochs, device)
    every = tcfg.checkpoint_every

    def each_epoch(out, snapshot):
        for i, rows in out:
            on_epoch(members[i], rows)
        if save_state is not None and every and group.epoch % every == 0 \
                and group.epoch < epochs:
            save_state(snapshot())

    splits = {name: split for name, split in (("val", group.val), ("test", group.test))
              if len(split)}
    label = f"a stacked group of {len(members)} {members[0].role} stages"
    progress = drive(group, stages=[m.role for m in members], epochs=epochs, splits=splits,
                     metric=data.metric, device=device, resume=resume, on_epoch=each_epoch,
                     on_failure=lambda i, message: on_failure(members[i], message),
                     bar=lambda start: GroupProgress(label, start))
    return group.results(progress)


class GroupProgress:
    """A stacked group's progress: where the process is (an interrupted run says it)."""

    def __init__(self, label: str, done: int):
        self.label = label
        training(label, done)

    def update(self, epoch: int, loss: float, val: float) -> None:
        training(self.label, epoch)

    def close(self) -> None:
        training(None)


class _StackedGroup:
    """The training state of a group: stacked weights, one optimiser, per-member RNGs,
    progress and best-so-far."""

    def __init__(self, members: list[Member], data: Data, tcfg, epochs: int, device):
        self.members, self.tcfg, self.device, self.epochs = members, tcfg, device, epochs
        self.models = []
        for member in members:  # each built as fit's caller builds it: after its seed
            torch.manual_seed(member.train_seed)
            self.models.append(build_model(member.model_cfg, data.input_shape,
                                           data.num_classes, member.role))
        self.base = copy.deepcopy(self.models[0]).to("meta")
        params, self.buffers = stack_module_state(self.models)
        self.state_keys = list(self.models[0].state_dict())  # a state dict's order
        self.dtype = dtype = working_dtype(tcfg)  # float64 with trainer.float64, as fit trains
        self.params = {k: v.detach().to(device, dtype).requires_grad_()
                       for k, v in params.items()}
        self.buffers = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
                        for k, v in self.buffers.items()}
        self.optimizer = make_optimizer(self.params.values(), tcfg, device)
        self.schedule = make_schedule(self.optimizer, tcfg, epochs,
                                      math.ceil(len(data.train) / tcfg.batch_size))
        self.orders = [torch.Generator().manual_seed(m.train_seed) for m in members]
        # augmented in-memory data: each member's batch augmented with its own draws, the
        # generator fit seeds for that seed
        self.augment = make_augment(members[0].cfg.dataset.get("augment"), data.input_shape) \
            if data.train.in_memory else None
        self.augment_rngs = [torch.Generator().manual_seed(m.train_seed + AUGMENT_SEED_OFFSET)
                             for m in members]
        self.train, self.val, self.test = (s.to(device, dtype)
                                           for s in (data.train, data.val, data.test))
        # training accuracy is over the labelled examples (a transfer set's have no label)
        self.labeled = int((data.train.y != UNLABELED).sum())
        for member in members:  # a transfer set's examples: the hard-label term is masked
            member.loss.all_labelled = self.labeled == len(data.train)
        self.teachers, self.teacher_of = _stack_teachers(members, device, dtype)
        self.live_teachers = _live_teachers(members, device, dtype)
        self.size, self.alive, self.epoch = len(members), [True] * len(members), 0
        self.metric = data.metric  # what selects each member's best epoch
        self.forward = vmap(self._forward_one)
        self.losses = StackedLosses([m.loss for m in members], device, dtype)
        self.autocast = configure_device(tcfg, device)

    def _forward_one(self, params, buffers, x):
        return functional_call(self.base, (params, buffers), (x,))

    # ------------------------------------------------------------ one epoch

    def train_epoch(self, epoch: int, steps: OptimizerSteps) -> list[EpochTrained]:
        self.losses.start_epoch(epoch)
        self.epoch, lr = epoch, self.optimizer.param_groups[0]["lr"]
        sums, correct, first_bad = self._train_epoch(steps)
        n, labeled = len(self.train), self.labeled
        return [EpochTrained(
            sums[i] / n, correct[i] / labeled * 100 if labeled else math.nan,
            None if not first_bad[i] else (
                f"{member.role} stage diverged at epoch {epoch}, step {first_bad[i]}: the "
                f"loss became NaN or infinite at lr {lr:g}"))
            for i, member in enumerate(self.members)]

    def evaluate(self, split) -> list[tuple[float, float]]:
        with eval_mode(self.base):  # batch norm on its running statistics, as fit evaluates
            losses, metrics = evaluate_stacked(self._forward_one, self.params, self.buffers,
                                               split, self.tcfg.eval_batch_size, self.metric)
        return list(zip(losses, metrics))

    def weights(self, i: int) -> dict:
        return self.state_of(i)

    def clip(self, max_norm: float) -> None:
        clip_each_member(self.params.values(), max_norm)

    def sync(self, rows: int) -> None:
        """One process: a stacked group trains alone."""

    def _train_epoch(self, steps: OptimizerSteps):
        m, n, size = len(self.members), len(self.train), self.tcfg.batch_size
        sums = torch.zeros(m, device=self.device, dtype=self.dtype)
        correct = torch.zeros(m, dtype=torch.long, device=self.device)
        bad_steps = []
        # the same permutations epoch_batches draws for each member's seed
        perms = torch.stack([torch.randperm(n, generator=g) for g in self.orders]).to(self.device)
        for start in range(0, n, size):
            idx = perms[:, start:start + size]  # (members, batch)
            xb, yb = self.train.x[idx], self.train.y[idx]
            if self.augment is not None:
                xb = torch.stack([self.augment(x, g) for x, g in zip(xb, self.augment_rngs)])
            with self.autocast():
                logits = widen(self.forward(self.params, self.buffers, xb))
            teacher = self._teacher_logits(idx, xb)
            losses = self.losses(logits, teacher, yb)
            steps.backward(losses.sum(), idx.shape[1])
            steps.take(self.optimizer)
            detached = losses.detach()
            bad_steps.append(~torch.isfinite(detached))
            sums += detached * idx.shape[1]
            correct += (logits.detach().argmax(-1) == yb).sum(1)
        bad = torch.stack(bad_steps)  # (steps, members)
        first_bad = [int(bad[:, i].nonzero()[0]) + 1 if bad[:, i].any() else 0
                     for i in range(m)]
        return sums.tolist(), correct.tolist(), first_bad

    def _teacher_logits(self, idx, xb) -> torch.Tensor | None:
        """(members, batch, classes): each member's teacher's logits on its batch, cached
        or computed now on the member's (augmented) inputs, each distinct live teacher
        once for all its members' batches; zeros for a member without a teacher."""
        cached = (self.teachers[self.teacher_of[:, None], idx]
                  if self.teachers is not None else None)
        if not self.live_teachers:
            return cached
        out = cached
        for live, members in self.live_teachers:
            logits, _ = live(None, xb[members].flatten(0, 1))
            logits = logits.view(len(members), xb.shape[1], -1)
            if out is None:
                out = logits.new_zeros(len(self.members), *logits.shape[1:])
            out[members] = logits
        return out

    # ------------------------------------------------------------ per member

    def state_of(self, i: int) -> dict:
        """Member ``i``'s model state dict (weights and buffers), copies on the CPU."""
        return {k: (self.params[k] if k in self.params else self.buffers[k])[i].detach()
                .to("cpu", copy=True) for k in self.state_keys}

    def results(self, progress: list[dict]) -> list[tuple[nn.Module, FitResult] | None]:
        stacked = self.optimizer.state_dict()
        out = []
        for i, member in enumerate(self.members):
            if not self.alive[i]:
                out.append(None)
                continue
            self.models[i].load_state_dict(self.state_of(i))
            out.append((self.models[i], result_of(
                progress[i], stage=member.role, seed=member.train_seed, epochs=self.epochs,
                optimizer_state=member_optimizer_state(stacked, i))))
        return out

    def snapshot(self, progress: list[dict]) -> dict:
        """The whole group's resumable state after its epoch: one file, not one per member."""
        return {"epoch": self.epoch,
                "keys": [m.entry.key if m.entry else None for m in self.members],
                "params": {k: v.detach().cpu() for k, v in self.params.items()},
                "buffers": {k: v.cpu() for k, v in self.buffers.items()},
                "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict() if self.schedule else None,
                "orders": [g.get_state() for g in self.orders],
                "augment_rngs": [g.get_state() for g in self.augment_rngs],
                "alive": list(self.alive),
                "progress": progress, "losses": [m.loss.state_dict() for m in self.members]}

    def restore(self, state: dict) -> list[dict]:
        """Go on from ``snapshot()`` of a group of the same members; its progress."""
        with torch.no_grad():
            for k, v in self.params.items():
                v.copy_(state["params"][k])
            for k, v in self.buffers.items():
                v.copy_(state["buffers"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])
        for member, order, order_state, loss_state in zip(self.members, self.orders,
                                                         state["orders"], state["losses"]):
            order.set_state(order_state)
            member.loss.load_state_dict(loss_state)
        for rng, rng_state in zip(self.augment_rngs, state.get("augment_rngs", [])):
            rng.set_state(rng_state)
        self.alive, self.epoch = list(state["alive"]), state["epoch"]
        return state["progress"]


def clip_each_member(params, max_norm: float) -> None:
    """clip_grad_norm_ of each member's own gradients (its slice of every tensor)."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))


@torch.no_grad()
def evaluate_stacked(forward_one, params, buffers, split, batch_size: int,
                     metric: Metric = ACCURACY):
    """Per member: (cross-entropy, the task's metric) on a split, as fit's evaluate gives."""
    chunks = [vmap(forward_one, in_dims=(0, 0, None))(params, buffers, x)
              for x in split.x.split(batch_size)]
    logits = torch.cat(chunks, dim=1)  # (members, examples, classes)
    labels = split.y.expand(len(logits), -1)
    loss = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)
    return loss.tolist(), metric.score(logits, split.y).tolist()


def member_optimizer_state(stacked: dict, i: int) -> dict:
    """The state dict a separate optimiser of member ``i`` alone would have, sliced from
    the stacked optimiser's."""
    state = {j: {k: v[i].clone() if torch.is_tensor(v) and v.dim() else
                 (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
             for j, s in stacked["state"].items()}
    return {"state": state, "param_groups": copy.deepcopy(stacked["param_groups"])}


def _live_teachers(members: list[Member], device,
                   dtype: torch.dtype) -> list[tuple[LiveTeacher, torch.Tensor]]:
    """Each distinct teacher run on every batch, with the indices of its members."""
    found: dict[str, tuple[LiveTeacher, list[int]]] = {}
    for i, member in enumerate(members):
        if member.targets is not None and member.targets.cached_logits is None:
            found.setdefault(member.teacher_key,
                             (member.targets.to(device, dtype), []))[1].append(i)
    return [(live, torch.tensor(index, device=device)) for live, index in found.values()]


def _stack_teachers(members: list[Member], device, dtype: torch.dtype):
    """The distinct teachers' logits stacked (teachers, examples, classes), and each
    member's teacher index; (None, None) when no member reads a teacher."""
    distinct: list[torch.Tensor] = []
    keys, index = [], []
    for member in members:
        logits = None if member.targets is None else member.targets.cached_logits
        if logits is None:
            index.append(0)
            continue
        if member.teacher_key not in keys:
            keys.append(member.teacher_key)
            distinct.append(logits)
        index.append(keys.index(member.teacher_key))
    if not distinct:
        return None, None
    return torch.stack(distinct).to(device, dtype), torch.tensor(index, device=device)

