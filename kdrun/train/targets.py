"""What a distilled student learns from: its teacher's targets, one class per kind.

Each kind declares what it adds to a distilled stage's key (``stage_key``), whether and
how a stacked group of students shares it (``stack_refusal``, ``cached_logits``) and the
entropy of its soft targets (``soft_target_entropy``): a new kind is one class here.

- ``CachedLogits``: the teacher's logits on the training set, computed once (and, for a
  feature loss, its features at the loss's layer).
- ``TopKLogits``: the teacher's k largest logits per row and one logit for the rest.
- ``LiveTeacher``: the teacher run on each training batch (augmented data, features that
  do not fit in memory).

``TeacherOnData`` computes the cached kinds once and stores them, sealed, in the teacher's
stage entry; ``choose_targets`` picks the kind a stage's loss and data allow.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from kdrun import distributed
from kdrun.data import Data
from kdrun.errors import ConfigError
from kdrun.losses.kd import soft_target_entropy
from kdrun.models import eval_mode
from kdrun.precision import widen, working_dtype
from kdrun.store.cache import StageEntry
from kdrun.store.files import load_sealed, save_sealed
from kdrun.train.features import FeatureTap, each_feature, feature_shape, predict_features
from kdrun.train.shards import on_shards

log = logging.getLogger("kdrun")


class CachedLogits:
    """Teacher logits computed once for the whole training set, looked up by index; and,
    for a loss that reads them, the teacher's features at its layer (a tensor, or a list
    of tensors for a list of layers), computed once alike."""

    stage_key: ClassVar[dict] = {}  # nothing besides the teacher's key
    stack_refusal: ClassVar[str | None] = None

    def __init__(self, logits: torch.Tensor, features=None):
        self.logits, self.features = logits, features

    def to(self, device, dtype: torch.dtype | None = None) -> CachedLogits:
        features = self.features
        if features is not None:
            features = each_feature(lambda f: f.to(device, dtype), features)
        return CachedLogits(self.logits.to(device, dtype), features)

    @property
    def cached_logits(self) -> torch.Tensor:
        """What a stacked group indexes for its members taught by this teacher."""
        return self.logits

    def feature_shape(self, input_shape=None):
        """The shape (without batch) of the cached features; a list for a list of layers."""
        return each_feature(lambda f: tuple(f.shape[1:]), self.features)

    def soft_target_entropy(self, T: float) -> float:
        return soft_target_entropy(self.logits, T)

    def __call__(self, idx: torch.Tensor, x: torch.Tensor):
        if self.features is None:
            return self.logits[idx], None
        return self.logits[idx], each_feature(lambda f: f[idx], self.features)


class LiveTeacher:
    """The teacher run on each training batch (in eval mode, without gradients): needed
    when the batch is augmented, so teacher and student see the same view, and when a
    loss reads the teacher's intermediate ``layer``. ``training_logits()``, when given,
    computes its logits on the unaugmented training set (for the entropy column)."""

    stage_key: ClassVar[dict] = {}
    cached_logits = None  # a stacked group runs it on each member's batch

    def __init__(self, model: nn.Module, autocast, layer: str | None = None,
                 training_logits: Callable[[], torch.Tensor] | None = None):
        self.model, self.autocast, self.layer = model.eval(), autocast, layer
        self.tap = FeatureTap(model, layer, "loss.teacher_layer") if layer else None
        self.training_logits = training_logits

    @property
    def stack_refusal(self) -> str | None:
        return "its loss reads the teacher's features" if self.tap is not None else None

    def feature_shape(self, input_shape):
        """The shape (without batch) of the teacher's feature at its layer."""
        return feature_shape(self.model, self.layer, input_shape, "loss.teacher_layer")

    def to(self, device, dtype: torch.dtype | None = None) -> LiveTeacher:
        self.model.to(device, dtype)
        return self

    def soft_target_entropy(self, T: float) -> float:
        """On the unaugmented training set: the teacher's logits there, computed once."""
        return soft_target_entropy(self.training_logits(), T)

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
    cached_logits = None
    stack_refusal: ClassVar[str] = ("its teacher targets are top-k logits (rebuilt batch by "
                                    "batch, never stacked)")

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
        """The mean entropy of the rebuilt distributions at T, a chunk of rows at a time
        (never all the logits at once)."""
        n = len(self.values)
        parts = [soft_target_entropy(self.dense(torch.arange(i, min(i + chunk, n))), T)
                 * (min(i + chunk, n) - i) for i in range(0, n, chunk)]
        return sum(parts) / n


TeacherTargets = CachedLogits | LiveTeacher | TopKLogits


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


@torch.no_grad()
def predict_aligned(model: nn.Module, x: torch.Tensor, view, batch_size: int) -> torch.Tensor:
    """(windows, student positions, teacher vocabulary): the teacher run on its view of
    each student window, its logits taken at the positions aligned with the student's."""
    x = x if torch.is_tensor(x) else x.x  # a split's windows
    out = []
    with eval_mode(model):
        for rows in x.split(batch_size):
            texts, aligned = view(rows)
            logits = model(texts)
            out.append(logits.gather(1, aligned[..., None].expand(-1, -1, logits.shape[-1])))
    return torch.cat(out)


@dataclass
class TeacherOnData:
    """A trained teacher (``model``, its stage ``entry``) and the data its students train
    on (``data``: with a transfer set, the labelled examples then the transfer set whose
    hash is ``transfer_digest``): what is computed from the teacher on that data is
    computed once in eval mode, stored sealed with the teacher and reused by every
    epoch and every job that distills from it."""

    model: nn.Module
    entry: StageEntry
    data: Data
    tcfg: object
    device: torch.device
    transfer_digest: str | None = None

    def logits(self) -> torch.Tensor:
        """The teacher's logits on every training example (a teacher with its own
        tokenizer: on its view of each window, at the positions aligned with the
        student's)."""
        view = self.data.teacher_view
        if view is not None:
            return self.on_training_set(
                "aligned logits", f"logits-aligned-{self.tcfg.distill_from}",
                lambda split: predict_aligned(self.model, split, view,
                                              self.tcfg.eval_batch_size))
        return self.on_training_set("logits", f"logits-{self.tcfg.distill_from}",
                                    lambda split: predict_logits(self.model, split,
                                                                 self.tcfg.eval_batch_size))

    def topk(self, k: int) -> list[torch.Tensor]:
        """The teacher's top-k logits (TopKLogits' columns) on every training example."""
        return self.on_training_set(
            "top-k logits", f"logits-top{k}-{self.tcfg.distill_from}",
            lambda split: predict_topk(self.model, split, k, self.tcfg.eval_batch_size))

    def features(self, layer):
        """The teacher's features at ``layer`` (a list of layers: a list of tensors)."""
        name = "+".join([layer] if isinstance(layer, str) else list(layer))
        return self.on_training_set(
            "features", f"features-{name}-{self.tcfg.distill_from}",
            lambda split: predict_features(self.model, split, layer, self.tcfg.eval_batch_size,
                                           "loss.teacher_layer"))

    def features_fit(self, layer) -> bool:
        """Whether the teacher's features at ``layer`` over the training set take at most
        ``trainer.cache_teacher_features_mb``."""
        shapes = feature_shape(self.model, layer, self.data.teacher_input_shape,
                               "loss.teacher_layer")
        shapes = [shapes] if isinstance(layer, str) else shapes
        size = sum(math.prod(shape) for shape in shapes) * len(self.data.train)
        megabytes = size * torch.finfo(working_dtype(self.tcfg)).bits / 8 / 1e6
        return megabytes <= self.tcfg.get("cache_teacher_features_mb", 0)

    def on_training_set(self, what: str, stem: str, compute):
        """``compute(training split)``, kept sealed in the teacher's cache entry as
        ``<stem>[-transfer-<hash>].pt``; a file that fails its checksum is computed again."""
        transfer = f"-transfer-{self.transfer_digest}" if self.transfer_digest else ""
        path = self.entry.dir / f"{stem}{transfer}.pt"
        writer = distributed.world().writer
        with self.entry.lock() if writer else contextlib.nullcontext():
            stored = load_sealed(path) if writer else None
            if distributed.from_writer(stored is not None):
                stored = stored if writer else load_sealed(path)
                return each_feature(lambda value: value.to(self.device), stored)
            if writer and (path.exists() or path.name in self.entry.derived()):
                log.warning("stage cache: %s is missing or does not match its checksum; "
                            "computing the teacher's %s again", path, what)
            dtype = working_dtype(self.tcfg)
            self.model.to(self.device, dtype)
            train = self.data.train  # paired views: on the teacher's view of each row
            train = train.teacher_side() if self.data.paired else train
            result = on_shards(compute, train.to(self.device, dtype))
            if writer:
                save_sealed(path, each_feature(lambda value: value.cpu(), result))
                self.entry.note_derived(path.name)
            return result


def choose_targets(teacher: TeacherOnData, loss, *, cacheable: bool, topk: int | None,
                   autocast) -> TeacherTargets:
    """When the training data is not augmented and ``cacheable`` (the default): the
    teacher's logits computed once (its top ``topk`` when asked for), and for a loss that
    reads them its features at the loss's layer, computed once too when they fit
    ``trainer.cache_teacher_features_mb``. Else the teacher itself, run on each batch."""
    features, classes = loss.reads_features, teacher.data.num_classes
    if cacheable and not features and topk and topk < classes:
        return TopKLogits(*teacher.topk(topk), classes)
    if cacheable and not features:
        return CachedLogits(teacher.logits())
    if cacheable and teacher.features_fit(loss.teacher_layer):
        return CachedLogits(teacher.logits(), teacher.features(loss.teacher_layer))
    if teacher.data.paired:  # a live teacher would read the student's view
        raise ConfigError("trainer.cache_teacher_features_mb",
                          teacher.tcfg.get("cache_teacher_features_mb"),
                          "the teacher reads another view than the student, so its features "
                          "are computed once on it: raise it until they fit")
    return LiveTeacher(teacher.model, autocast, loss.teacher_layer if features else None,
                       training_logits=teacher.logits)
