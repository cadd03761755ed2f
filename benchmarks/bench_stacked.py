"""N models trained by kdrun as the batched launcher trains them (kdrun.train.stacked's
train_group: one stacked model) against the same N trained one at a time (kdrun.train.fit's
fit, as the basic launcher trains them), side by side in one process: whether a model
trains faster stacked on this device. kdrun/train/stacked.py's check_batchable keeps 2-D
convolutions on a CPU out of stacked groups on this measurement.

Each round trains the N models for ``--epochs`` epochs both ways (batch 100, random data
of the given input shape, 2 000 training examples, cross-entropy, per-epoch evaluation
included), alternating which goes first; prints the medians per training step (all N
models) and the ratio one-at-a-time / stacked: above 1, stacking is faster.

    python benchmarks/bench_stacked.py [--model teacher/cnn] [--input 1x40] [--members 2,6]
    python benchmarks/bench_stacked.py --input 3x32x32   # the same CNN on images
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kdrun.data import Data, Split  # noqa: E402
from kdrun.losses import CE  # noqa: E402
from kdrun.models import build_model  # noqa: E402
from kdrun.run.pipeline import pick_device  # noqa: E402
from kdrun.train.fit import fit  # noqa: E402
from kdrun.train.stacked import Member, train_group  # noqa: E402
from tests.helpers import make_config  # noqa: E402

CLASSES, EXAMPLES, HELD_OUT = 10, 2000, 200


def random_data(shape) -> Data:
    def split(n):
        return Split(torch.randn(n, *shape), torch.randint(0, CLASSES, (n,)))

    return Data("random", split(EXAMPLES), split(HELD_OUT), split(HELD_OUT), CLASSES)


def one_at_a_time(model_cfg, cfg, data, members: int, epochs: int, device) -> None:
    for seed in range(members):
        torch.manual_seed(seed)
        model = build_model(model_cfg, data.input_shape, CLASSES)
        fit(model, data, CE(), cfg.trainer, stage="scratch", epochs=epochs, seed=seed,
            device=device, progress=False)


def stacked(model_cfg, cfg, data, members: int, epochs: int, device) -> None:
    group = [Member(entry=None, role="scratch", seed=seed, train_seed=seed, model_cfg=model_cfg,
                    loss=CE(), teacher_logits=None, teacher_key=None, cfg=cfg, context=None,
                    data=data, device=device) for seed in range(members)]

    def failed(member, message):
        raise RuntimeError(message)

    train_group(group, data, cfg.trainer, epochs, device, lambda member, rows: None, failed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="teacher/cnn", help="configs/<group>/<name>.yaml")
    parser.add_argument("--input", default="1x40", help="one example's shape, e.g. 3x32x32")
    parser.add_argument("--members", default="2,6", help="how many models, comma-separated")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    model_cfg = OmegaConf.load(ROOT / "configs" / f"{args.model}.yaml")
    cfg = make_config(f"device={args.device}")
    data = random_data(tuple(int(d) for d in args.input.split("x")))
    steps = args.epochs * -(-EXAMPLES // cfg.trainer.batch_size)
    print(f"{args.model} on {args.input} inputs, {device}, {torch.get_num_threads()} CPU threads, "
          f"batch {cfg.trainer.batch_size}; ms per training step of all members (evaluation "
          f"included), medians of {args.rounds} rounds")
    for members in (int(m) for m in args.members.split(",")):
        ways = {"one at a time": one_at_a_time, "stacked": stacked}
        times = {name: [] for name in ways}
        for train in ways.values():  # warm-up: allocator, thread pools, kernels chosen
            train(model_cfg, cfg, data, members, 1, device)
        for r in range(args.rounds):
            for name in (list(ways) if r % 2 == 0 else list(reversed(ways))):
                t0 = time.perf_counter()
                ways[name](model_cfg, cfg, data, members, args.epochs, device)
                times[name].append((time.perf_counter() - t0) / steps * 1e3)
        alone, together = (statistics.median(times[n]) for n in ways)
        print(f"{members:3d} models: one at a time {alone:7.2f} ms, stacked {together:7.2f} ms, "
              f"ratio {alone / together:.2f}x")


if __name__ == "__main__":
    main()
