"""Training steps of N models stacked as the batched launcher stacks them
(torch.func.stack_module_state + functional_call + vmap, one fused Adam) against the
same N models trained one at a time, side by side in one process: whether a model
trains faster stacked on this device. kdrun/batched.py's check_batchable keeps 2-D
convolutions on a CPU out of stacked groups on this measurement.

Each round times ``--steps`` steps (batch 100, random data of the given input shape,
cross-entropy) both ways, alternating which goes first; prints the medians per step
(all N models) and the ratio one-at-a-time / stacked: above 1, stacking is faster.

    python benchmarks/bench_stacked.py [--model teacher/cnn] [--input 1x40] [--members 2,6]
    python benchmarks/bench_stacked.py --input 3x32x32   # the same CNN on images
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.func import functional_call, stack_module_state, vmap

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kdrun.models import build_model  # noqa: E402
from kdrun.pipeline import pick_device  # noqa: E402

BATCH, CLASSES, EXAMPLES = 100, 10, 2000


def build(model_cfg, shape, members: int, device) -> list[torch.nn.Module]:
    models = []
    for seed in range(members):
        torch.manual_seed(seed)
        models.append(build_model(model_cfg, shape, CLASSES).to(device))
    return models


def one_at_a_time(models, x, y, steps: int) -> None:
    for model in models:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        for _ in range(steps):
            idx = torch.randint(0, len(x), (BATCH,), device=x.device)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def stacked(models, x, y, steps: int) -> None:
    params, buffers = stack_module_state(models)
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    base = copy.deepcopy(models[0]).to("meta")
    forward = vmap(lambda p, b, xb: functional_call(base, (p, b), (xb,)))
    optimizer = torch.optim.Adam(params.values(), lr=1e-3, fused=True)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (len(models), BATCH), device=x.device)
        logits = forward(params, buffers, x[idx])  # (members, batch, classes)
        losses = F.cross_entropy(logits.transpose(1, 2), y[idx], reduction="none").mean(1)
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimizer.step()


def timed(train, models, x, y, steps: int, device) -> float:
    t0 = time.perf_counter()
    train(models, x, y, steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="teacher/cnn", help="configs/<group>/<name>.yaml")
    parser.add_argument("--input", default="1x40", help="one example's shape, e.g. 3x32x32")
    parser.add_argument("--members", default="2,6", help="how many models, comma-separated")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    model_cfg = OmegaConf.load(ROOT / "configs" / f"{args.model}.yaml")
    shape = tuple(int(d) for d in args.input.split("x"))
    x = torch.randn(EXAMPLES, *shape, device=device)
    y = torch.randint(0, CLASSES, (EXAMPLES,), device=device)
    print(f"{args.model} on {args.input} inputs, {device}, {torch.get_num_threads()} CPU threads, "
          f"batch {BATCH}; ms per step of all members, medians of {args.rounds} rounds")
    for members in (int(m) for m in args.members.split(",")):
        ways = {"one at a time": one_at_a_time, "stacked": stacked}
        times = {name: [] for name in ways}
        for train in ways.values():  # warm-up: allocator, thread pools, kernels chosen
            train(build(model_cfg, shape, members, device), x, y, 3)
        for r in range(args.rounds):
            for name in (list(ways) if r % 2 == 0 else list(reversed(ways))):
                models = build(model_cfg, shape, members, device)
                seconds = timed(ways[name], models, x, y, args.steps, device)
                times[name].append(seconds / args.steps * 1e3)
        alone, together = (statistics.median(times[n]) for n in ways)
        print(f"{members:3d} models: one at a time {alone:7.2f} ms, stacked {together:7.2f} ms, "
              f"ratio {alone / together:.2f}x")


if __name__ == "__main__":
    main()
