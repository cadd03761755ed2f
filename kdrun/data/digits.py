"""scikit-learn's bundled 8x8 handwritten digits."""

from __future__ import annotations

import torch

from kdrun.data.base import DATASETS, FRACTION, SEED
from kdrun.data.raw import RawData, carve_test


@DATASETS.register("digits", rules={"test_fraction": FRACTION, "seed": SEED})
def digits(test_fraction: float = 0.2, seed: int = 0) -> RawData:
    """scikit-learn's bundled 8x8 handwritten digits (1 797 images, UCI); the test
    split is carved with ``seed`` since the set has none of its own."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.int64)
    return carve_test(x, y, test_fraction, seed, num_classes=10)
