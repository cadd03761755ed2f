"""`kdrun loss=fitnet` on the default data with the teacher's features computed once
and cached (the default) against the teacher run on every batch
(`trainer.cache_teacher_features_mb=0`, kdrun's behaviour before the cache), each a whole
process from a cold stage cache, interleaved in rounds. Prints per round the wall time
and the distilled stages' own training seconds (summed over the student seeds), then
the medians and their ratios. With ``--load``, another torch process keeps the CPU busy
meanwhile (two threads of matrix products), as on the shared machine where the live
teacher made the run take minutes.

    python benchmarks/bench_feature_cache.py [--runs 3] [--loss fitnet] [--load]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from benchmarks.bench_default_sweep import timed  # noqa: E402

LOAD = ("import torch\ntorch.set_num_threads(2)\na = torch.randn(1000, 1000)\n"
        "while True:\n    a @ a\n")


@contextlib.contextmanager
def cpu_load(enabled: bool):
    process = subprocess.Popen([sys.executable, "-c", LOAD]) if enabled else None
    try:
        yield
    finally:
        if process is not None:
            process.kill()
            process.wait()


def one_run(command: list[str]) -> tuple[float, float]:
    """(wall seconds, the distilled stages' training seconds) of one cold run."""
    with tempfile.TemporaryDirectory(prefix="bench_feature_cache_") as root:
        wall = timed(command, Path(root))
        (summary,) = Path(root).glob("runs/*/*/summary.csv")
        rows = pd.read_csv(summary)
        return wall, float(rows[rows.role == "distilled"].train_seconds.sum())


def arguments(doc: str) -> argparse.Namespace:
    """--runs, --loss and --load, as this script and bench_threads.py take them."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--loss", default="fitnet")
    parser.add_argument("--load", action="store_true", help="another torch process meanwhile")
    return parser.parse_args()


def main() -> None:
    args = arguments(__doc__)
    commands = {"features cached": [f"loss={args.loss}"],
                "teacher on every batch": [f"loss={args.loss}",
                                           "trainer.cache_teacher_features_mb=0"]}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    with cpu_load(args.load):
        for run in range(args.runs):
            for name, command in commands.items():
                results[name].append(one_run(command))
                wall, distill = results[name][-1]
                print(f"run {run + 1} {name:<24} {wall:6.1f} s, distilled stages {distill:6.1f} s",
                      flush=True)
    (cached_wall, cached_distill), (live_wall, live_distill) = (
        (statistics.median(w for w, _ in results[name]),
         statistics.median(d for _, d in results[name])) for name in commands)
    print(f"\nmedians over {args.runs} run(s){' under load' if args.load else ''} (kdrun "
          f"loss={args.loss}): whole run {cached_wall:.1f} s cached vs {live_wall:.1f} s live, "
          f"{live_wall / cached_wall:.2f}x; distilled stages {cached_distill:.1f} s vs "
          f"{live_distill:.1f} s, {live_distill / cached_distill:.2f}x")


if __name__ == "__main__":
    main()
