"""What a small sweep of the default pipeline costs next to one run of it: `kdrun`,
then `kdrun -m loss.T=2,4 loss.alpha=0.5,0.9` with the default launcher (batched) and
with Hydra's basic one, each a whole process from a cold stage cache, interleaved in
rounds so the machine's drift hits them alike. Prints each round's wall times, then the
medians and each sweep's cost in single runs.

    python benchmarks/bench_default_sweep.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from benchmarks.bench_sweep import TIMED_CHILD  # noqa: E402

SWEEP = ["-m", "loss.T=2,4", "loss.alpha=0.5,0.9"]
COMMANDS = {"single run": [], "sweep, default launcher": SWEEP,
            "sweep, hydra/launcher=basic": [*SWEEP, "hydra/launcher=basic"]}


def timed(args: list[str], root: Path) -> float:
    """Wall seconds of one `kdrun ARGS` process writing under ``root``."""
    kdrun = Path(sys.executable).with_name("kdrun")
    command = [str(kdrun), *args, "progress=false", f"output_root={root}"]
    out = subprocess.run([sys.executable, "-c", TIMED_CHILD, *command], capture_output=True,
                         text=True, check=False)
    if out.returncode:
        sys.exit(f"kdrun {' '.join(args)} failed:\n{out.stderr}")
    return json.loads(out.stdout.splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for run in range(args.runs):
        for name, command in COMMANDS.items():
            with tempfile.TemporaryDirectory(prefix="bench_default_sweep_") as root:
                seconds[name].append(timed(command, Path(root)))
            print(f"run {run + 1} {name:<28} {seconds[name][-1]:6.1f} s", flush=True)
    single = statistics.median(seconds["single run"])
    print(f"\nmedians over {args.runs} run(s):")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"  {name:<28} {median:6.1f} s  = {median / single:.2f}x a single run")


if __name__ == "__main__":
    main()
