"""A whole sweep with Hydra's basic launcher against the same sweep with the batched
launcher, back to back in one invocation, each from a cold stage cache.

The grid is the README's: loss.T=1,2,4,8 x loss.alpha=0.1,0.5,0.9 x seed=0,1 with
repeats=1 (24 jobs: 2 teachers, 2 scratch students, 24 distilled students) on the
default labelled data (dataset.unlabeled=0: no transfer set). Each sweep is one
`kdrun -m` process, timed whole: interpreter start, teachers, students, every job's
files and the sweep report. Prints per launcher the
wall time, the students trained per second of it and the peak resident memory, then
the ratio basic / batched; with --runs N, N rounds of both and the medians. Then where
the last batched sweep's time went, phase by phase, read from its log's timestamps. Last,
the distilled students' test accuracies of the last round, basic and batched side by
side, and how far apart they are next to how far one setting's two seeds are.

    python benchmarks/bench_sweep.py [--runs 3] [--epochs 30] [--device auto]
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the grid of issue 13 on the default labelled data, without the default's transfer set
GRID = ["loss.T=1,2,4,8", "loss.alpha=0.1,0.5,0.9", "seed=0,1", "repeats=1",
        "dataset.unlabeled=0"]
STUDENTS = 2 + 24  # scratch (one per seed) + distilled (one per job)
# Runs one sweep as a child process and prints its wall time and the child's peak RSS.
TIMED_CHILD = """
import json, resource, subprocess, sys, time
started, t0 = time.time(), time.perf_counter()
code = subprocess.run(sys.argv[1:], capture_output=True, text=True)
seconds = time.perf_counter() - t0
if code.returncode:
    sys.exit(code.stderr[-2000:])
rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "rss_mb": rss_mb, "started": started,
                  "log": code.stdout}))
"""
# The batched launcher's log lines that start a phase, and the phase each starts
PHASES = {"Launching": "planning every job (and torch's first optimiser: ~0.8 s of imports)",
          "training": None,  # the line itself names the group: "training 26 students ..."
          "running the jobs": "the jobs' own runs: each job's files",
          "sweep report": "the sweep report, then exit"}
HYDRA_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[HYDRA\] (.*)$")


def distilled_accuracies(root: Path) -> dict:
    """(T, alpha, seed) -> the distilled student's test accuracy (best-val epoch)."""
    import pandas as pd

    (summary,) = root.glob("multirun/*/*/summary.csv")
    rows = pd.read_csv(summary)
    rows = rows[rows.role == "distilled"]
    return {(r["loss.T"], r["loss.alpha"], r.seed): r.test_metric_best_val
            for _, r in rows.iterrows()}


def agreement(basic: dict, batched: dict) -> str:
    """How far batched and basic accuracies are apart, next to how far one setting's two
    seeds are apart within the basic sweep (the noise any single number carries)."""
    differences = [batched[k] - basic[k] for k in basic]
    seeds = sorted({k[2] for k in basic})
    between_seeds = [basic[(T, a, seeds[1])] - basic[(T, a, seeds[0])]
                     for T, a, s in basic if s == seeds[0]]
    rms = lambda values: statistics.fmean(v * v for v in values) ** 0.5  # noqa: E731
    mean_basic, mean_batched = statistics.mean(basic.values()), statistics.mean(batched.values())
    return (f"largest difference: {max(map(abs, differences)):.2f} points; mean basic "
            f"{mean_basic:.2f}, batched {mean_batched:.2f}; "
            f"batched - basic {statistics.mean(differences):+.2f} +- "
            f"{statistics.stdev(differences) / len(differences) ** 0.5:.2f} (standard error), "
            f"rms {rms(differences):.2f}; one setting's seeds {seeds[0]} and {seeds[1]} differ "
            f"by {rms(between_seeds):.2f} rms (basic)")


def phases(result: dict) -> list[tuple[float, str]]:
    """The sweep's wall time split at the phase lines of its log: (seconds, phase)."""
    marks = [(result["started"], "starting Python, importing, Hydra composing the sweep")]
    for line in result["log"].splitlines():
        match = HYDRA_LINE.match(line)
        if not match:
            continue
        stamp, message = match.groups()
        for marker, phase in PHASES.items():
            if marker in message:
                when = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
                marks.append((when, phase or message.split(": ", 1)[-1]))
                break
    ends = [when for when, _ in marks[1:]] + [result["started"] + result["seconds"]]
    return [(end - when, phase) for (when, phase), end in zip(marks, ends)]


def run_sweep(launcher: str, epochs: int, device: str, root: Path) -> dict:
    kdrun = Path(sys.executable).with_name("kdrun")
    command = [str(kdrun), "-m", f"hydra/launcher={launcher}", *GRID,
               f"trainer.epochs={epochs}", f"device={device}", "progress=false",
               f"output_root={root}"]
    out = subprocess.run([sys.executable, "-c", TIMED_CHILD, *command], capture_output=True,
                         text=True, check=False)
    if out.returncode:
        sys.exit(f"{launcher} sweep failed:\n{out.stderr}")
    return {**json.loads(out.stdout.splitlines()[-1]), "accuracies": distilled_accuracies(root)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    results = {"basic": [], "batched": []}
    for run in range(args.runs):
        for launcher in results:
            with tempfile.TemporaryDirectory(prefix=f"bench_sweep_{launcher}_") as root:
                started = time.strftime("%H:%M:%S")
                result = run_sweep(launcher, args.epochs, args.device, Path(root))
            results[launcher].append(result)
            print(f"run {run + 1} {launcher:<8} {result['seconds']:7.1f} s  "
                  f"{STUDENTS / result['seconds']:5.2f} students/s  "
                  f"peak RSS {result['rss_mb']:6.0f} MB  (started {started})", flush=True)
        ratio = results["basic"][-1]["seconds"] / results["batched"][-1]["seconds"]
        print(f"run {run + 1} basic / batched wall time: {ratio:.2f}x", flush=True)
    print("\nwhere the last batched sweep's time went (from its log's timestamps):")
    for seconds, phase in phases(results["batched"][-1]):
        print(f"  {seconds:6.1f} s  {phase}")
    print("\ndistilled test accuracy (%), last round:   T  alpha seed   basic  batched")
    basic, batched = (results[k][-1]["accuracies"] for k in ("basic", "batched"))
    for key in sorted(basic):
        print(f"{'':42}{key[0]:>3g} {key[1]:>5g} {key[2]:>4d} {basic[key]:7.2f} "
              f"{batched[key]:8.2f}")
    print(agreement(basic, batched))
    median = {k: statistics.median(r["seconds"] for r in v) for k, v in results.items()}
    print(f"median over {args.runs} run(s): basic {median['basic']:.1f} s, batched "
          f"{median['batched']:.1f} s, ratio {median['basic'] / median['batched']:.2f}x "
          f"(24-job grid, {args.epochs} epochs, device={args.device})")


if __name__ == "__main__":
    main()
