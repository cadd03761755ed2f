"""Test helpers: small data sets written in torchvision's own on-disk formats,
the installed commands, and a helper to compose kdrun configs as the CLI does."""

from __future__ import annotations

import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_module

import kdrun.cli  # noqa: F401  (registers kdrun's resolvers, as the command does)

os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses: no thread oversubscription

KDRUN = str(Path(sys.executable).parent / "kdrun")
KDRUN_REPORT = str(Path(sys.executable).parent / "kdrun-report")
TINY = ["progress=false", "repeats=1", "trainer.epochs=1", "num_threads=1"]


def make_config(*overrides: str):
    """The config `kdrun OVERRIDES...` would run (compose API: no output dir is made)."""
    with initialize_config_module("kdrun.configs", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as MNIST ships it: big-endian magic (0x08 = uint8, then the number of
    dimensions), the dimensions as big-endian int32, then the bytes."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 120, n_test: int = 40,
                seed: int = 0) -> dict:
    """Random 28x28 digits in torchvision's MNIST layout: <root>/<folder>/raw/*-ubyte."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, array in arrays.items():
        write_idx(raw / name, array)
    return arrays


def write_cifar(root: Path, classes: int = 10, n_per_batch: int = 20, seed: int = 0) -> dict:
    """Random 32x32 RGB images as pickled batches in torchvision's CIFAR-10/100 layout."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if classes == 10 else torchvision.datasets.CIFAR100
    rng = np.random.default_rng(seed)
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    label_key = "labels" if classes == 10 else "fine_labels"
    batches = {}
    for name, _ in cls.train_list + cls.test_list:
        batch = {"data": rng.integers(0, 256, (n_per_batch, 3 * 32 * 32), dtype=np.uint8),
                 label_key: rng.integers(0, classes, n_per_batch).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
        batches[name] = batch
    meta = {cls.meta["key"]: [f"class{i}" for i in range(classes)]}
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps(meta))
    return batches
