"""One epoch of each CIFAR-100 benchmark pair, timed through kdrun itself.

Writes a CIFAR-100-format data set of random images (torchvision's on-disk layout) with
``--images`` training images, then runs ``kdrun experiment=cifar100_<pair>`` for one
epoch (the experiment's own recipe: batch 64, SGD, crop + flip, the teacher run on
every augmented batch) and reads each stage's training seconds from its summary. The
full recipe's time is extrapolated linearly: 50,000 images x 240 epochs.

    python benchmarks/bench_cifar_epoch.py                     # CPU or GPU, whatever kdrun picks
    python benchmarks/bench_cifar_epoch.py --images 2000 --device cuda
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

# kdrun in a child process, with torchvision's md5 check of the CIFAR files relaxed to
# "exists": random images cannot match the real files' checksums
CHILD = """
import os, sys
import torchvision.datasets.cifar as cifar
cifar.check_integrity = lambda path, md5=None: os.path.isfile(path)
from kdrun.cli.main import main
sys.argv = ["kdrun", *sys.argv[1:]]
main()
"""
PAIRS = ["resnet32x4_resnet8x4", "wrn_40_2_wrn_16_2", "resnet56_resnet20", "vgg13_vgg8",
         "resnet32x4_ShuffleV2"]
RECIPE_IMAGES, RECIPE_EPOCHS = 50_000, 240


def write_cifar100(root: Path, train_images: int, seed: int = 0) -> None:
    """Random images as CIFAR-100's pickled train and test files."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", train_images), ("test", max(100, train_images // 5))):
        batch = {"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
                 "fine_labels": rng.integers(0, 100, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"fine_label_names": [f"class{i}" for i in range(100)]}
    (folder / "meta").write_bytes(pickle.dumps(meta))


def time_pair(pair: str, data: Path, out: Path, device: str) -> dict:
    command = [sys.executable, "-c", CHILD, f"experiment=cifar100_{pair}", f"dataset.root={data}",
               "trainer.epochs=1", "split.val_fraction=0", "cache.enabled=false",
               "progress=false", f"device={device}", f"output_root={out / pair}",
               "latency.repeats_b1=4", "latency.repeats_b256=4", "latency.warmup=1"]
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode:
        sys.exit(f"{pair} failed:\n{done.stderr[-2000:]}")
    summary = pd.read_csv(next((out / pair).rglob("summary.csv")))
    seconds = summary.set_index("role").train_seconds
    return {"pair": pair, "device": summary.device.iloc[0],
            "teacher s": seconds["teacher"], "student s": seconds["scratch"],
            "distill s": seconds["distilled"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--pairs", nargs="+", default=PAIRS)
    args = parser.parse_args()
    scale = RECIPE_IMAGES / args.images * RECIPE_EPOCHS
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar100(Path(tmp) / "data", args.images)
        for pair in args.pairs:
            row = time_pair(pair, Path(tmp) / "data", Path(tmp) / "out", args.device)
            total = row["teacher s"] + row["student s"] + row["distill s"]
            row["full recipe, h"] = total * scale / 3600
            rows.append(row)
            print(row, flush=True)
    print(f"\none epoch of {args.images:,} images (batch 64); full recipe = {RECIPE_IMAGES:,} "
          f"images x {RECIPE_EPOCHS} epochs, teacher + scratch + distilled, extrapolated")
    print("| pair | device | teacher s/epoch | student s/epoch | distill s/epoch | "
          "full recipe, h |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pair']} | {r['device']} | {r['teacher s']:.1f} | {r['student s']:.1f} | "
              f"{r['distill s']:.1f} | {r['full recipe, h']:.0f} |")


if __name__ == "__main__":
    main()
