"""MNIST-1D (Greydanus 2020), generated locally by the ``mnist1d`` package: the offline
default data set."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from kdrun.checks import number
from kdrun.data.base import DATASETS, SEED, UNLABELED_COUNT, unlabeled_seed
from kdrun.data.raw import RawData
from kdrun.store.files import load_sealed, save_sealed


@DATASETS.register("mnist1d", rules={"num_samples": number(10, integer=True), "seed": SEED,
                                     "unlabeled": UNLABELED_COUNT})
def mnist1d(num_samples: int = 5000, seed: int = 42, cache_dir: str | None = None,
            unlabeled: int = 0) -> RawData:
    """MNIST-1D (Greydanus 2020), generated locally with the package's standard
    arguments: 4 000 train / 1 000 test sequences of length 40. Never downloads.
    ``unlabeled`` more sequences come from the same generator under a seed of their
    own (so none repeats a train or test sequence), standardised as the package
    standardises every set it makes: by that set's own mean and std."""
    d = _mnist1d_arrays(num_samples, seed, cache_dir)
    as_x = lambda a: a.to(torch.float32).unsqueeze(1)  # noqa: E731 (N, 1, 40)
    as_y = lambda a: a.to(torch.int64)  # noqa: E731
    raw = RawData(as_x(d["x"]), as_y(d["y"]), as_x(d["x_test"]), as_y(d["y_test"]), 10)
    if unlabeled:
        extra = _mnist1d_arrays(-(-unlabeled // 10) * 10, unlabeled_seed(seed), cache_dir)
        x, y = (torch.cat([extra[k], extra[f"{k}_test"]])[:unlabeled] for k in ("x", "y"))
        raw.x_unlabeled, raw.y_unlabeled = as_x(x), as_y(y)
    return raw


@functools.lru_cache(maxsize=4)  # sweep jobs in one process generate it once
def _mnist1d_arrays(num_samples: int, seed: int, cache_dir: str | None) -> dict:
    """The package's generated arrays (x, y, x_test, y_test) as tensors. Generating takes
    seconds of pure Python, so they are kept in ``cache_dir`` (a checksummed file, one
    per package version and arguments) for later runs."""
    from importlib.metadata import version

    path = None
    if cache_dir:
        name = f"mnist1d-{version('mnist1d')}-n{num_samples}-seed{seed}.pt"
        path = Path(cache_dir).expanduser() / name
    d = load_sealed(path) if path else None
    if d is None:
        from mnist1d.data import get_dataset_args, make_dataset  # slow to import

        args = get_dataset_args()
        args.num_samples, args.seed = num_samples, seed
        d = {k: torch.tensor(v) for k, v in make_dataset(args).items()
             if k in ("x", "y", "x_test", "y_test")}
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_sealed(path, d)
    return d
