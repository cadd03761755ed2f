"""Where the time of benchmarks/bench_lm_text.py goes: cProfile over ``--steps`` steps of
the plain loop (nanoGPT's train.py) and of kdrun's fit, alternated ``--rounds`` times in
one process (the evaluations kept out: a held-out split of 16 windows), and the
functions whose own time differs most between the two, in ms a step.

    python benchmarks/profile_lm_text.py [--text input.txt] [--steps 200] [--rounds 2]

Run it on a quiet machine: another process on the cores slows the fused optimiser's
threads far more than the rest, and the attribution with it.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from benchmarks.bench_lm_text import BATCH, BLOCK, compose, kdrun_loop, plain_loop  # noqa: E402
from kdrun.data import load_data  # noqa: E402
from kdrun.data.text import grammar_text  # noqa: E402


def own_times(profile: cProfile.Profile) -> dict[str, float]:
    """Seconds spent in each function itself, by a readable name."""
    return {f"{Path(file).name}:{line}({name})" if file != "~" else name: stats[2]
            for (file, line, name), stats in pstats.Stats(profile).stats.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, help="a UTF-8 text file (default: generated)")
    parser.add_argument("--steps", type=int, default=200, help="steps of each loop a round")
    parser.add_argument("--rounds", type=int, default=2, help="alternated rounds")
    args = parser.parse_args()
    text = args.text
    if text is None:
        text = Path(tempfile.mkdtemp()) / "generated.txt"
        text.write_text(grammar_text(args.steps * BATCH * BLOCK // 30, seed=0))
    cfg = compose(text, args.steps * BATCH, 1)
    cfg.split.max_test = 16
    data = load_data(cfg.dataset, cfg.split)
    raw = torch.tensor(list(text.read_bytes()), dtype=torch.long)
    train_text = raw[: int(len(raw) * 0.9)]
    device = torch.device("cpu")
    totals = {"plain": defaultdict(float), "kdrun": defaultdict(float)}
    seconds = {"plain": 0.0, "kdrun": 0.0}
    for _ in range(args.rounds):
        for side in ("plain", "kdrun"):
            profile = cProfile.Profile()
            profile.enable()
            if side == "plain":
                spent = plain_loop(train_text, data.num_classes, args.steps, [], None, device)[0]
            else:
                spent = kdrun_loop(data, cfg, device)[0]
            profile.disable()
            seconds[side] += sum(spent)
            for name, own in own_times(profile).items():
                totals[side][name] += own
    steps = args.rounds * args.steps
    print(f"ms a step: plain loop {seconds['plain'] / steps * 1e3:.1f}, kdrun "
          f"{seconds['kdrun'] / steps * 1e3:.1f} (under the profiler)")
    names = set(totals["plain"]) | set(totals["kdrun"])
    diffs = sorted(((totals["kdrun"][n] - totals["plain"][n]) / steps * 1e3, n) for n in names)
    print("own time, kdrun minus plain, ms a step (the largest each way):")
    for diff, name in [*diffs[:8], *diffs[-8:]]:
        print(f"  {diff:+7.3f}  {name}")


if __name__ == "__main__":
    main()
