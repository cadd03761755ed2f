"""What an in-memory builder returns (RawData: tensors, already scaled to a sensible
range) and how it becomes a run's Data: the training examples subsampled
(split.max_train), a label budget kept (split.labeled, kdrun/data/labels.py) and the rest
made the transfer set, the validation split carved (or the data's own), the inputs
standardised by the labelled training split's statistics; with paired views
(kdrun/data/views.py) every row keeps its teacher's input and the teacher its own data."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdrun.data.base import Data, Split, Stats, subsample_indices
from kdrun.data.labels import UNLABELED, split_labeled
from kdrun.data.metrics import ACCURACY, Metric
from kdrun.errors import DataError


@dataclass
class RawData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    random_labels: bool = False  # labels carry no signal: evaluate on the training data
    x_unlabeled: torch.Tensor | None = None  # extra transfer-set examples (dataset.unlabeled)
    y_unlabeled: torch.Tensor | None = None  # their true labels, where the data has them: read
    # only by the "scratch, all labels" reference, never by a distilled student
    metric: Metric = ACCURACY  # what the task is judged by (kdrun/data/metrics.py)
    end_token: int | None = None  # instruction data: the token that ends a response
    # a teacher with its own tokenizer (dataset.teacher_tokenizer): the same text as it
    # reads it, and its view of the student's windows (kdrun/data/text.py ByteView)
    teacher: RawData | None = None
    teacher_view: object | None = None
    # a validation split of the data's own (a graph's public split), instead of one carved
    # from the training examples with split.val_fraction
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None
    # paired views (kdrun/data/views.py): the teacher's view of the same rows, in the same
    # order (x_train, x_val, x_test, x_unlabeled); the teacher trains on it with every
    # training label, the student reads this one
    pair: RawData | None = None
    graph: object | None = None  # a view whose inputs are node ids: the graph they index

    def to_data(self, name: str, split_cfg, augment_cfg=None, normalize=None) -> Data:
        """In-memory data is augmented later, batched on the device (kdrun/data/augment.py)."""
        return split_tensors(name, self, split_cfg, normalize)


def carve_test(x, y, test_fraction, seed, num_classes) -> RawData:
    """A test split of ``test_fraction`` of the examples, drawn with ``seed``, for a set
    that has none of its own."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = round(len(y) * test_fraction)
    te, tr = perm[:n_test], perm[n_test:]
    return RawData(x[tr], y[tr], x[te], y[te], num_classes)


def split_tensors(name: str, raw: RawData, split_cfg, normalize: Stats | None = None) -> Data:
    """In-memory data split into train / val / test (and its transfer set), standardised
    by its training statistics (kdrun/data/base.py: load_data)."""
    return _scaled_split(name, raw, split_cfg, normalize)[0]


def _scaled_split(name: str, raw: RawData, split_cfg, normalize: Stats | None = None):
    """The Data, and how its inputs were standardised (a function of an input tensor)."""
    rows = _subsample(_rows(raw, "train"), split_cfg.max_train, split_cfg.seed)
    if raw.random_labels:  # nothing to generalise to: report memorisation of the training set
        if split_cfg.get("labeled") is not None:
            raise DataError("split.labeled: random labels cannot be distilled from a transfer "
                            "set (there is nothing to generalise); set it to null")
        return Data(name, rows, rows, rows, raw.num_classes, eval_split="train",
                    metric=raw.metric), _unscaled
    if split_cfg.get("labeled") is not None and rows.y.ndim > 1:
        raise DataError(f"split.labeled: dataset={name} is text whose every token is its own "
                        "label; a label budget applies to labelled examples: set it to null")
    budget = split_labeled(rows.y, split_cfg.get("labeled"), split_cfg.seed, raw.num_classes)
    transfer = _transfer_set(rows, budget, raw)
    if budget is not None:  # the validation split is carved from the labelled part only
        rows = rows.rows(budget[0])
    if raw.x_val is None:
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(split_cfg.seed))
        n_val = round(len(rows) * split_cfg.val_fraction)
        train, val = rows.rows(perm[n_val:]), rows.rows(perm[:n_val])
    else:  # the data's own validation split
        train, val = rows, _rows(raw, "val")
    test = _subsample(_rows(raw, "test"), split_cfg.max_test, split_cfg.seed)
    splits = [train, val, test] + ([transfer[0]] if transfer is not None else [])
    scale = _standardize(splits, split_cfg, normalize)
    data = Data(name, *splits[:3], raw.num_classes, metric=raw.metric,
                end_token=raw.end_token, teacher_view=raw.teacher_view, graph=raw.graph)
    if raw.teacher is not None:
        data.teacher_data = split_tensors(name, raw.teacher, split_cfg)
    if raw.pair is not None:  # the teacher's view, with every training label
        data.teacher_data, scale_pair = _scaled_split(name, raw.pair, _every_label(split_cfg))
        for split in splits:
            split.other = scale_pair(split.other)
    if transfer is not None:
        data.transfer, data.transfer_labels = splits[3], transfer[1]
    return data, scale


def _rows(raw: RawData, split: str) -> Split:
    """A split's rows as the builder gave them, each with its teacher's view when paired."""
    x, y = getattr(raw, f"x_{split}"), getattr(raw, f"y_{split}")
    return Split(x, y, None if raw.pair is None else getattr(raw.pair, f"x_{split}"))


def _every_label(split_cfg):
    """``split_cfg`` without a label budget: the teacher of paired views reads its view
    with every training label (the budget is the student's)."""
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(split_cfg, resolve=True)
    settings["labeled"] = None
    return OmegaConf.create(settings)


def _unscaled(x):
    return x


def _standardize(splits: list[Split], split_cfg, normalize: Stats | None):
    """With split.standardize, float inputs standardised by the first (the labelled
    training) split's statistics, or by ``normalize``; the function that did it."""
    first = splits[0].x
    if not (split_cfg.standardize and first.is_floating_point() and len(first)):
        return _unscaled
    mean, std = _stats(first) if normalize is None else _given(normalize, first)

    def scale(x):
        return None if x is None else (x - mean) / std

    for s in splits:
        s.x = scale(s.x)
    return scale


def _transfer_set(rows: Split, budget, raw: RawData) -> tuple[Split, torch.Tensor | None] | None:
    """The unlabelled examples (labels UNLABELED): the training examples outside the label
    budget, then the data set's extra unlabelled ones; and their true labels where the
    data has them all."""
    parts, labels = [], []
    if budget is not None:
        parts.append(rows.rows(budget[1]))
        labels.append(parts[-1].y)
    if raw.x_unlabeled is not None and len(raw.x_unlabeled):
        parts.append(Split(raw.x_unlabeled, raw.y_unlabeled, None if raw.pair is None
                           else raw.pair.x_unlabeled))
        labels.append(raw.y_unlabeled)
    if not parts:
        return None
    inputs = parts[0]
    for part in parts[1:]:
        inputs = inputs.joined(part)
    known = all(part is not None for part in labels)
    unlabeled = torch.full((len(inputs.x),), UNLABELED, dtype=torch.int64)
    return Split(inputs.x, unlabeled, inputs.other), torch.cat(labels) if known else None


def _subsample(rows: Split, limit, seed) -> Split:
    return rows.rows(subsample_indices(len(rows.x), limit, seed))


def _given(normalize: Stats, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Given per-channel statistics, shaped for (N, C, ...) inputs of ``x``'s channels."""
    mean, std = (torch.tensor(v, dtype=x.dtype) for v in normalize)
    if x.ndim < 3 or x.shape[1] != len(mean):
        raise DataError(f"dataset.normalize=model: the model's statistics are for "
                        f"{len(mean)} channels, this data's inputs have shape "
                        f"{tuple(x.shape[1:])} (for gray images: dataset.channels=3)")
    shape = (len(mean),) + (1,) * (x.ndim - 2)
    return mean.view(shape), std.view(shape)


def _stats(x: torch.Tensor):
    """Per-channel mean/std for (N, C, ...) inputs, per-feature for flat (N, D)."""
    dims = [0] + list(range(2, x.ndim))
    mean = x.mean(dim=dims, keepdim=True)[0]
    if len(x) < 2:  # one example has no spread: centre it only
        return mean, torch.ones_like(mean)
    std = x.std(dim=dims, keepdim=True)[0].clamp_min(1e-6)
    return mean, std
