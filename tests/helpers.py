"""Test helpers: small data sets written in torchvision's own on-disk formats,
the installed commands, and a helper to compose kdrun configs as the CLI does."""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from hydra import compose, initialize_config_module

import kdrun.cli.main  # noqa: F401  (registers kdrun's resolvers, as the command does)

os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses: no thread oversubscription

KDRUN = str(Path(sys.executable).parent / "kdrun")
KDRUN_REPORT = str(Path(sys.executable).parent / "kdrun-report")
TINY = ["progress=false", "repeats=1", "trainer.epochs=1", "num_threads=1"]


# Two computation orders of one training (stacked or alone, 1 or 2 threads, fused or
# looped optimiser kernels, other evaluation chunks), both in float64
# (trainer.float64=true): the same maths up to rounding. Why 1e-6 holds on any machine:
# float64's unit roundoff is 1.1e-16, so a gradient averaged over a batch in another order
# moves by about 1e-15 (its terms are at most ~10 here). Adam divides by sqrt(v) + eps
# with eps = 1e-8, which amplifies a change of a near-zero gradient by at most 1/eps: a
# step moves by at most lr * 1e-15 / 1e-8 = 1e-9 (lr = 0.01), 1e-8 after the ~20 steps of
# the tests' 2 epochs, 100x under the bound. (In float32 the same rounding, ~1e-6, divided
# by eps reaches Adam's full step, lr: why float32 comparisons fail on other CPUs.) A
# real bug (a swapped seed, batch order, loss setting or member) moves weights by ~1e-2.
FLOAT64_WEIGHT_BOUND = 1e-6


def assert_float64_weights_agree(ours: dict, theirs: dict, what: str = "") -> float:
    """Every tensor of two float64 state dicts within FLOAT64_WEIGHT_BOUND; returns the
    largest difference found."""
    assert ours.keys() == theirs.keys(), what
    largest = 0.0
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype == torch.float64 or not tensor.is_floating_point()
        difference = float((ours[name].double() - tensor.double()).abs().max()) \
            if tensor.numel() else 0.0
        assert difference <= FLOAT64_WEIGHT_BOUND, (what, name, difference)
        largest = max(largest, difference)
    return largest


def run_events(run: Path) -> list[dict]:
    """A run folder's events.jsonl (what each stage did: trained, reused, resumed), in
    order; none before the run wrote any."""
    path = Path(run) / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def slurm_commands_on_path(monkeypatch, folder: Path) -> None:
    """Stand-ins for Slurm's sbatch and srun first on the PATH: a README line that
    launches on Slurm validates as on a login node (where Slurm is absent, preflight
    stops it with one line, tests/test_sweep_failures.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("sbatch", "srun"):
        (folder / name).write_text("#!/bin/sh\nexit 1\n")
        (folder / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")


# the fewest latency rounds validation allows: a run's timing in a test costs little
QUICK_LATENCY = ["latency.repeats_b1=4", "latency.repeats_b256=4", "latency.warmup=1"]


def run_then_rerun(tmp_path: Path, *overrides: str):
    """`kdrun OVERRIDES` in this process into ``tmp_path/a`` (the summary rows by role,
    and the result), then again into ``tmp_path/b`` on the same cache, which must reuse
    every stage."""
    from kdrun.run import pipeline

    def run(folder: str) -> dict:
        return pipeline.run(make_config(*overrides, f"cache.dir={tmp_path}/cache"),
                            tmp_path / folder)

    result = run("a")
    run("b")
    assert {e["event"] for e in run_events(tmp_path / "b")} == {"reused"}
    return pd.DataFrame(result["rows"]).set_index("role"), result


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


def fit_or_snapshot(model, data, loss, tcfg, *, stage: str, epochs: int, resume=None,
                    stop_at: int | None = None, fit_with=None, **more):
    """``fit()`` (or ``fit_with``, of fit's contract, given ``more`` of its arguments)
    ``model`` on the CPU with seed 0: its FitResult, or, with ``stop_at``, the training
    state snapshot() gives at the end of that epoch (what a kill then leaves)."""
    from kdrun.train.fit import fit

    saved = {}

    def on_epoch(rows, snapshot):
        if rows[0]["epoch"] == stop_at:
            saved["state"] = snapshot()
            raise KeyboardInterrupt

    try:
        return (fit_with or fit)(model, data, loss, tcfg, stage=stage, epochs=epochs, seed=0,
                                 device=torch.device("cpu"), resume=resume, on_epoch=on_epoch,
                                 progress=False, **more)
    except KeyboardInterrupt:
        return saved["state"]
