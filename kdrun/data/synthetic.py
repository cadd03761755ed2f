"""Synthetic Gaussian data labelled by a hidden random network (or at random)."""

from __future__ import annotations

import torch

from kdrun.checks import boolean, number
from kdrun.data.base import DATASETS, FRACTION, SEED, UNLABELED_COUNT, unlabeled_seed
from kdrun.data.raw import RawData, carve_test
from kdrun.errors import DataError


@DATASETS.register("synthetic", rules={
    "n": number(10, integer=True), "dim": number(1, integer=True),
    "classes": number(2, integer=True), "random_labels": boolean, "test_fraction": FRACTION,
    "seed": SEED, "unlabeled": UNLABELED_COUNT})
def synthetic(
    n: int = 2000, dim: int = 50, classes: int = 5, random_labels: bool = False,
    test_fraction: float = 0.2, seed: int = 0, unlabeled: int = 0,
) -> RawData:
    """Gaussian features; labels from a hidden random one-hidden-layer network, so
    that a test split means something. ``random_labels=true`` draws labels at random
    instead (the seed script's memorisation setting): accuracy is then measured on
    the training data and labelled as such. ``unlabeled`` more examples are drawn
    from the same distribution with a generator of their own."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    if random_labels:
        if unlabeled:
            raise DataError("dataset.unlabeled: random labels cannot be distilled from a "
                            "transfer set (there is nothing to generalise); set it to 0")
        y = torch.randint(0, classes, (n,), generator=g)
        return RawData(x, y, x, y, classes, random_labels=True)
    w1 = torch.randn(dim, 64, generator=g) / dim**0.5
    w2 = torch.randn(64, classes, generator=g)
    rule = lambda v: (torch.tanh(v @ w1 * 2) @ w2).argmax(1)  # noqa: E731
    raw = carve_test(x, rule(x), test_fraction, seed, classes)
    if unlabeled:
        extra = torch.Generator().manual_seed(unlabeled_seed(seed))
        raw.x_unlabeled = torch.randn(unlabeled, dim, generator=extra)
        raw.y_unlabeled = rule(raw.x_unlabeled)
    return raw
