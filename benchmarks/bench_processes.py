"""One run on 2 processes (`torchrun --nproc_per_node=2 -m kdrun`, data parallel over
gloo) against one process (one thread, as `num_threads=auto` gives these small models)
and one process on 2 threads, on this machine's cores. Each is a whole run from a cold
stage cache, interleaved in rounds; prints each round's wall time and the training
seconds of its stages, then the medians and their ratios to one process's.

    python benchmarks/bench_processes.py [--runs 3] [KDRUN OVERRIDES ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

BIN = Path(sys.executable).parent
COMMANDS = {
    "1 process": [str(BIN / "kdrun")],
    "1 process, 2 threads": [str(BIN / "kdrun"), "num_threads=2"],
    "2 processes": [str(BIN / "torchrun"), "--nproc_per_node=2", "--master_port=29517", "-m",
                    "kdrun"],
}


def one_run(command: list[str], overrides: list[str]) -> tuple[float, float]:
    """(wall seconds, the stages' training seconds) of one run from a cold cache."""
    with tempfile.TemporaryDirectory(prefix="bench_processes_") as root:
        start = time.perf_counter()
        subprocess.run([*command, "progress=false", f"output_root={root}", *overrides],
                       check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        wall = time.perf_counter() - start
        (summary,) = Path(root).glob("runs/*/*/summary.csv")
        return wall, float(pd.read_csv(summary).train_seconds.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args, overrides = parser.parse_known_args()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in COMMANDS}
    for run in range(args.runs):
        for name, command in COMMANDS.items():
            results[name].append(one_run(command, overrides))
            wall, train = results[name][-1]
            print(f"run {run + 1} {name:<22} {wall:6.1f} s, training {train:6.1f} s", flush=True)
    medians = {name: [statistics.median(r[i] for r in rows) for i in (0, 1)]
               for name, rows in results.items()}
    wall_1, train_1 = medians["1 process"]
    print(f"\nmedians over {args.runs} run(s) on {os.cpu_count()} cores "
          f"(kdrun {' '.join(overrides) or '(the default run)'}, from a cold cache):")
    for name, (wall, train) in medians.items():
        print(f"  {name:<22} wall {wall:6.1f} s ({wall / wall_1:4.2f}x one process's), "
              f"training {train:6.1f} s ({train / train_1:4.2f}x)")


if __name__ == "__main__":
    main()
