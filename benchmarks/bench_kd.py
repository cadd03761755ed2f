"""kdrun's training loop against the seed notebook's loop, side by side in one process.

Reference (the notebook): MNIST read by torchvision from its idx files, ToTensor,
DataLoader(batch 64, shuffle=True), and on every distillation step a teacher
forward pass. kdrun: the same files loaded once as tensors on the device, batches
indexed from a permutation, teacher logits computed once (timed separately).
Same models (teacher 784-1200-1200-10 with dropout 0.5, student 784-20-10), batch
64, Adam lr 1e-3, same KD loss. The script writes 60 000 random 28x28 images in
MNIST's own format first, so it runs offline.

Prints, per stage, the median training seconds per epoch of each and the ratio
reference / kdrun, and the peak memory during the stage (resident set on CPU,
allocated on CUDA); writes the same to benchmarks/results.csv.

    python benchmarks/bench_kd.py [--epochs 3] [--device auto] [--train 60000]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kdrun.data import Data, Split  # noqa: E402
from kdrun.data.torchvision_sets import mnist  # noqa: E402
from kdrun.losses import CE, KD  # noqa: E402
from kdrun.models import build_model  # noqa: E402
from kdrun.run.pipeline import pick_device  # noqa: E402
from kdrun.train.fit import fit  # noqa: E402
from kdrun.train.targets import CachedLogits, predict_logits  # noqa: E402
from tests.helpers import write_idx  # noqa: E402

TEACHER = {"arch": "mlp", "hidden": [1200, 1200], "dropout": 0.5}
STUDENT = {"arch": "mlp", "hidden": [20], "dropout": 0.0}
BATCH, LR, T, ALPHA = 64, 1e-3, 7.0, 0.8


class PeakMemory:
    """Peak resident memory (CPU, sampled every 2 ms) or peak allocated memory (CUDA)
    while the ``with`` block runs, in MB."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb, self._stop = device, 0.0, threading.Event()

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak_mb = max(self.peak_mb, int(f.read().split()[1]) * page / 1e6)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated() / 1e6
        else:
            self._stop.set()
            self._thread.join()


def write_mnist(root: Path, n_train: int, n_test: int = 1000) -> None:
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (n_train, 28, 28)))
    write_idx(raw / "train-labels-idx1-ubyte", rng.integers(0, 10, n_train))
    write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28)))
    write_idx(raw / "t10k-labels-idx1-ubyte", rng.integers(0, 10, n_test))


def model(spec: dict, device) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(OmegaConf.create(spec), (1, 28, 28), 10).to(device)


# ---------------------------------------------------------------- reference loop


def reference_stage(root: Path, net, device, epochs: int, teacher=None) -> list[float]:
    """The notebook: a DataLoader over torchvision's MNIST with ToTensor; when
    distilling, the teacher (eval mode, no grad) runs on every batch."""
    data = torchvision.datasets.MNIST(root, train=True,
                                      transform=torchvision.transforms.ToTensor())
    loader = DataLoader(data, batch_size=BATCH, shuffle=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    loss_fn = KD(T=T, alpha=ALPHA) if teacher is not None else CE()
    if teacher is not None:
        teacher.eval()
    seconds = []
    for _ in range(epochs):
        net.train()
        t0 = time.perf_counter()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            target = None
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(x)
            loss = loss_fn(net(x), target, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return seconds


# ---------------------------------------------------------------- kdrun


def kdrun_data(root: Path) -> Data:
    """The same files through kdrun's loader: once, as tensors (no val split here)."""
    raw = mnist(str(root))
    half = len(raw.y_test) // 2
    return Data("mnist", Split(raw.x_train, raw.y_train),
                Split(raw.x_test[:half], raw.y_test[:half]),
                Split(raw.x_test[half:], raw.y_test[half:]), 10)


def kdrun_stage(data: Data, net, device, epochs: int, teacher=None) -> list[float]:
    loss = KD(T=T, alpha=ALPHA) if teacher is not None else CE()
    return kdrun_epochs(data, net, loss, device, epochs, teacher, BATCH, LR, 4096)


def kdrun_epochs(data: Data, net, loss, device, epochs: int, teacher, batch: int, lr: float,
                 eval_batch_size: int) -> list[float]:
    """kdrun's fit() with Adam at ``lr``, no schedule: the training seconds of each epoch."""
    trainer = OmegaConf.create({
        "optimizer": "adam", "lr": lr, "weight_decay": 0.0, "schedule": "none",
        "batch_size": batch, "eval_batch_size": eval_batch_size, "grad_clip": None,
        "amp": True, "tf32": True, "cudnn_benchmark": True, "fused_optimizer": True,
        "channels_last": True, "compile": False})
    seconds = []
    fit(net, data, loss, trainer, stage="bench", epochs=epochs, seed=0, device=device,
        teacher=teacher, progress=False,
        on_epoch=lambda rows, snapshot: seconds.append(rows[0]["seconds"]))
    return seconds


# ---------------------------------------------------------------- main


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU with its thread count: what the figures ran on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per stage (median taken)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--train", type=int, default=60000, help="training images to write")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results.csv")
    args = parser.parse_args()
    device = pick_device(args.device)
    name = device_name(device)
    print(f"device: {name}; torch {torch.__version__}; {args.train} images, batch {BATCH}, "
          f"{args.epochs} epochs per stage, medians")

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_mnist(root, args.train)
        data = kdrun_data(root)
        teacher_ref, teacher_ours = model(TEACHER, device), model(TEACHER, device)
        stages = [("teacher", TEACHER, False), ("scratch", STUDENT, False),
                  ("distill", STUDENT, True)]
        for stage, spec, distill in stages:
            with PeakMemory(device) as ref_mem:
                ref = reference_stage(root, model(spec, device), device, args.epochs,
                                      teacher_ref if distill else None)
            logits_seconds = float("nan")
            with PeakMemory(device) as our_mem:
                targets = None
                if distill:
                    t0 = time.perf_counter()
                    targets = CachedLogits(predict_logits(teacher_ours, data.train.x.to(device),
                                                          4096))
                    logits_seconds = time.perf_counter() - t0
                net = teacher_ours if stage == "teacher" else model(spec, device)
                ours = kdrun_stage(data, net, device, args.epochs, targets)
            row = {"device": name, "stage": stage, "epochs": args.epochs,
                   "reference_s": statistics.median(ref), "kdrun_s": statistics.median(ours),
                   "speedup": statistics.median(ref) / statistics.median(ours),
                   "teacher_logits_s": logits_seconds, "reference_peak_mb": ref_mem.peak_mb,
                   "kdrun_peak_mb": our_mem.peak_mb,
                   "memory_ratio": our_mem.peak_mb / ref_mem.peak_mb,
                   "torch": torch.__version__, "date": datetime.date.today().isoformat()}
            results.append(row)
            print(f"{stage:<8} reference {row['reference_s']:7.3f} s/epoch   kdrun "
                  f"{row['kdrun_s']:7.3f} s/epoch   x{row['speedup']:5.1f}   peak MB "
                  f"{row['reference_peak_mb']:7.0f} vs {row['kdrun_peak_mb']:7.0f} "
                  f"(x{row['memory_ratio']:.2f})", flush=True)
            if distill:
                print(f"         (kdrun's one-time teacher-logits pass: {logits_seconds:.3f} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
