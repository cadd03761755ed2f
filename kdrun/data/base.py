"""Data set builders, registered by name in DATASETS, and the train/val/test split.

A builder returns a ``RawData`` (kdrun/data/raw.py: tensors, already scaled to a sensible
range), which ``load_data`` turns into a run's Data: subsampled, the validation split
carved from the training data with a fixed seed, standardised with training statistics.
All data sets here are small enough to live in memory as tensors. To add a data
set: write its builder, add it to DATASETS, add ``configs/dataset/<name>.yaml``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace

import torch

from kdrun.checks import number
from kdrun.data.metrics import ACCURACY, Metric
from kdrun.errors import DataError
from kdrun.registry import Registry

# name -> builder(**keys) returning something with .to_data(name, split_cfg, augment_cfg): RawData
# here, FolderData for image folders (kdrun/data/imagefolder.py); a config may also name a
# builder of your own package by its import path (name: mypackage.data.my_set)
DATASETS = Registry("dataset")
SEED = number(integer=True)
Stats = tuple[tuple[float, ...], tuple[float, ...]]  # per-channel mean, std
FRACTION = number(0, 1, lo_open=True, hi_open=True)


@dataclass
class Split:
    """A split held in memory as tensors (on the training device during training)."""

    x: torch.Tensor  # float32, (N, *input_shape); int64 token ids for text (N, positions)
    y: torch.Tensor  # int64, (N,); for text the next tokens, (N, positions)
    other: torch.Tensor | None = None  # paired views: the teacher's input of each row
    in_memory = True

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def to(self, device, dtype: torch.dtype | None = None) -> Split:
        """On ``device``; the inputs in ``dtype`` when given (trainer.float64)."""
        def moved(x):  # token ids and node ids stay integers
            return None if x is None else x.to(device, dtype if x.is_floating_point() else None)

        return Split(moved(self.x), self.y.to(device), moved(self.other))

    def joined(self, other: Split) -> Split:
        """This split's examples, then ``other``'s."""
        paired = self.other is not None and other.other is not None
        return Split(torch.cat([self.x, other.x]), torch.cat([self.y, other.y]),
                     torch.cat([self.other, other.other]) if paired else None)

    def rows(self, idx: torch.Tensor | None) -> Split:
        """The rows ``idx`` (all of them when None), each with its teacher's input."""
        if idx is None:
            return self
        return Split(self.x[idx], self.y[idx], None if self.other is None else self.other[idx])

    def teacher_side(self) -> Split:
        """The teacher's view of these rows (paired views), else these rows."""
        return self if self.other is None else Split(self.other, self.y)

    def batches(self, batch_size: int, generator: torch.Generator | None = None):
        """(indices, inputs, labels) per batch: in a random order fixed by ``generator``
        (every example once), or in order when there is none."""
        if generator is None:
            order = torch.arange(len(self), device=self.x.device).split(batch_size)
        else:
            order = epoch_batches(len(self), batch_size, generator, self.x.device)
        for idx in order:
            yield idx, self.x[idx], self.y[idx]


def epoch_batches(n: int, batch_size: int, generator: torch.Generator, device) -> tuple:
    """Index tensors of one epoch: a random permutation of range(n), cut into batches.
    Every example is visited exactly once; the order is fixed by the generator."""
    return torch.randperm(n, generator=generator).to(device).split(batch_size)


@dataclass
class Data:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    eval_split: str = "test"  # "train" when the labels are random: accuracy is memorisation
    digest: str | None = None  # fingerprint(), once computed
    # The transfer set: examples whose labels the distilled student never sees (their y
    # is UNLABELED), from split.labeled and dataset.unlabeled; None when there are none.
    transfer: Split | None = None
    transfer_labels: torch.Tensor | None = None  # their true labels where known (reference row)
    transfer_digest: str | None = None  # transfer_fingerprint(), once computed
    metric: Metric = ACCURACY  # what the task is judged by: its data set declares it
    # instruction data (kdrun/data/instructions.py): the token that ends a response, which
    # a model continuing a prompt writes last; None for other data
    end_token: int | None = None
    # a teacher with its own tokenizer: its own data (the teacher stage's), and its view
    # of the student's windows, (token windows) -> (its windows, the aligned positions)
    teacher_data: Data | None = None
    teacher_view: object | None = None
    graph: object | None = None  # node ids index this graph (kdrun/data/graphs.py)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.train.input_shape

    @property
    def teacher_input_shape(self) -> tuple[int, ...]:
        """What the teacher reads: its own data's inputs where it has its own."""
        return (self.teacher_data or self).input_shape

    @property
    def paired(self) -> bool:
        """Teacher and student read two views of the same examples, row by row."""
        return self.train.in_memory and self.train.other is not None

    @property
    def per_position(self) -> bool:
        """Whether the targets are one per position of each example (text for a language
        model, kdrun/data/text.py), not one per example."""
        return self.train.in_memory and self.train.y.ndim > 1

    @property
    def unlabeled_count(self) -> int:
        return len(self.transfer) if self.transfer is not None else 0

    def distill_train(self) -> Split:
        """What a distilled student trains on: the labelled training split, then the
        transfer set (labels UNLABELED). An epoch of the distill stage is one pass over
        both."""
        return self.train if self.transfer is None else self.train.joined(self.transfer)

    def training_on(self, train: Split) -> Data:
        """This data with ``train`` as the training split a stage learns from, and no
        transfer set of its own."""
        return replace(self, train=train, transfer=None, transfer_labels=None, digest=None,
                       transfer_digest=None)

    def all_labels_train(self) -> Split | None:
        """The training split and the transfer set with its true labels (the "scratch,
        all labels" reference), or None when the transfer set's labels are unknown."""
        if self.transfer is None or self.transfer_labels is None:
            return None
        return self.train.joined(Split(self.transfer.x, self.transfer_labels))


# ---------------------------------------------------------------- shared by builders

UNLABELED_COUNT = number(0, integer=True)  # the rule of a builder's ``unlabeled`` argument


def unlabeled_seed(seed: int) -> int:
    """The generator seed of a data set's extra unlabelled examples: never a seed the
    labelled data of a small seed uses."""
    return int.from_bytes(hashlib.sha256(f"unlabeled:{seed}".encode()).digest()[:4], "big")


# dataset config keys that are not builder arguments (normalize: kdrun/run/pipeline.py)
NOT_BUILDER_KEYS = ("name", "augment", "normalize")


# ---------------------------------------------------------------- splits


# In-memory data already built in this process, by its settings and the state of its
# files: the jobs of a sweep run in one process (the basic and batched launchers) build
# each data set once. A few entries at most: each holds a whole data set.
_LOADED: dict[str, Data] = {}
_LOADED_MAX = 4


def load_data(dataset_cfg, split_cfg, normalize: Stats | None = None) -> Data:
    """Build the data set ``dataset_cfg.name`` (its other keys are the builder's
    arguments) and split it into train / val / test as ``split_cfg`` says. The
    validation split may be empty (``val_fraction=0``): models are then selected by
    their last epoch. ``normalize`` (per-channel mean and std, e.g. a pretrained model's)
    replaces the training data's own statistics when ``split.standardize`` is on. An
    empty training or test split is a DataError. In-memory data
    built earlier in this process with the same settings and unchanged files is reused
    (never modify a returned Data in place)."""
    key = _load_key(dataset_cfg, split_cfg, normalize)
    if key in _LOADED:
        return _LOADED[key]
    data = _build(dataset_cfg, split_cfg, normalize)
    if data.train.in_memory:
        if len(_LOADED) >= _LOADED_MAX:
            _LOADED.clear()
        _LOADED[key] = data
    return data


def _load_key(dataset_cfg, split_cfg, normalize) -> str:
    """The settings, and the size and modification time of every file under the data
    set's root (none for generated data): a changed file is a new key."""
    from omegaconf import OmegaConf

    settings = [OmegaConf.to_container(c, resolve=True) if OmegaConf.is_config(c) else c
                for c in (dataset_cfg, split_cfg)]
    files = []
    root = dataset_cfg.get("root")
    if root and os.path.isdir(root):
        for folder, _, names in sorted(os.walk(root)):
            for name in sorted(names):
                stat = os.stat(os.path.join(folder, name))
                files.append((folder, name, stat.st_size, stat.st_mtime_ns))
    return hashlib.sha256(repr((settings, normalize, files)).encode()).hexdigest()


def _build(dataset_cfg, split_cfg, normalize: Stats | None) -> Data:
    name = dataset_cfg.name
    params = {k: v for k, v in dict(dataset_cfg).items() if k not in NOT_BUILDER_KEYS}
    builder = DATASETS.get(name, "dataset.name")
    data = builder(**params).to_data(name, split_cfg, dataset_cfg.get("augment"), normalize)
    for split in ("train", "test"):
        if len(getattr(data, split)) == 0:
            raise DataError(f"dataset={name}: the {split} split is empty with these settings "
                            f"(split.max_train, split.max_test, split.val_fraction, "
                            f"dataset.test_fraction); keep at least one {split} example")
    return data


def fingerprint(data: Data) -> str:
    """A hash of the examples and labels of every split, as the models see them: the
    stage cache keys data by content, so changed files on disk are never mistaken for
    the data a cached stage was trained on. In-memory data is hashed once."""
    if data.train.in_memory and data.digest is not None:
        return data.digest
    graph = () if data.graph is None else data.graph.tensors()  # what node ids index
    data.digest = _content_hash((data.train, data.val, data.test), graph)
    return data.digest


def transfer_fingerprint(data: Data) -> str | None:
    """The same hash of the transfer set (its labels are all UNLABELED: the hidden ones
    never enter it), or None when there is none: part of the key of every stage that
    trains on it."""
    if data.transfer is None:
        return None
    if not data.transfer.in_memory or data.transfer_digest is None:
        data.transfer_digest = _content_hash((data.transfer,))
    return data.transfer_digest


def _content_hash(splits, tensors=()) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(tensor.contiguous().cpu().numpy())
    for split in splits:
        if split.in_memory:
            for tensor in (split.x, split.y, split.other):
                if tensor is None:  # no teacher's view: the hash of a single-view split
                    continue
                digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
                digest.update(tensor.contiguous().cpu().numpy())  # hashed in place, no copy
        else:
            split.update_digest(digest)
        digest.update(b"|")
    return digest.hexdigest()[:20]


def subsample_indices(n: int, limit: int | None, seed: int) -> torch.Tensor | None:
    """``limit`` of ``range(n)`` drawn with ``seed`` (split.max_train / max_test), or
    None when there is nothing to drop."""
    if limit is None or limit >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]
