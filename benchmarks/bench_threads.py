"""`kdrun loss=fitnet` on the default data as it runs now (`num_threads=auto`: one thread
for these small models; teacher features cached) against torch's default thread count
(`num_threads=null`, one per core) and against kdrun before issue 31 (torch's threads
and the teacher run on every batch: `trainer.cache_teacher_features_mb=0`). Each is a
whole process from a cold stage cache, interleaved in rounds; prints each round's wall
time, then the medians and their ratios to now's. With ``--load``, another torch
process keeps two cores busy meanwhile (as on the shared machine where the run took
minutes): a thread of kdrun's that waits for a descheduled partner stalls every small
operation.

    python benchmarks/bench_threads.py [--runs 3] [--loss fitnet] [--load]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from benchmarks.bench_feature_cache import arguments, cpu_load, one_run  # noqa: E402


def main() -> None:
    args = arguments(__doc__)
    loss = f"loss={args.loss}"
    commands = {"now (auto threads)": [loss],
                "torch's threads": [loss, "num_threads=null"],
                "before issue 31": [loss, "num_threads=null",
                                    "trainer.cache_teacher_features_mb=0"]}
    walls: dict[str, list[float]] = {name: [] for name in commands}
    with cpu_load(args.load):
        for run in range(args.runs):
            for name, command in commands.items():
                walls[name].append(one_run(command)[0])
                print(f"run {run + 1} {name:<20} {walls[name][-1]:6.1f} s", flush=True)
    medians = {name: statistics.median(seconds) for name, seconds in walls.items()}
    now = medians["now (auto threads)"]
    print(f"\nmedians over {args.runs} run(s){' under load' if args.load else ''} "
          f"(kdrun {loss}, whole run from a cold cache):")
    for name, median in medians.items():
        print(f"  {name:<20} {median:6.1f} s  {median / now:5.2f}x now's time")


if __name__ == "__main__":
    main()
