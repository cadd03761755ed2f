"""The loss of a language model's batch, whole or in chunks of rows
(`trainer.loss_chunk_rows`): peak memory and time of one forward and backward pass of
`loss=jsd` (GKD's divergence plus the cross-entropy) on the logits of 4 windows of 1,024
tokens over a 32,000-token vocabulary (Llama's), float32, on the CPU. Each setting runs
in a fresh process (peak resident memory is per process), interleaved in rounds;
prints the medians and their ratios to the whole batch's.

    python benchmarks/bench_loss_chunks.py [--runs 3] [--rows 4096] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, resource, sys, time
import torch
from omegaconf import OmegaConf
from kdrun.losses import build_loss
rows, vocab, chunk = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
student = torch.randn(rows, vocab, requires_grad=True)
teacher, labels = torch.randn(rows, vocab), torch.randint(vocab, (rows,))
loss = build_loss(OmegaConf.create({"name": "jsd"}))
loss.chunk_rows = None if chunk == "none" else int(chunk)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
loss(student, teacher, labels).backward()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "peak_mb": peak, "inputs_mb": before}))
"""


def one_run(rows: int, vocab: int, chunk: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(rows), str(vocab), chunk],
                         capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    settings = ["none", "1024", "256"]
    results: dict[str, list[dict]] = {chunk: [] for chunk in settings}
    for run in range(args.runs):
        for chunk in settings:
            results[chunk].append(one_run(args.rows, args.vocab, chunk))
            r = results[chunk][-1]
            print(f"run {run + 1} loss_chunk_rows={chunk:<5} {r['seconds']:6.2f} s, peak "
                  f"{r['peak_mb']:7.0f} MB (inputs in place: {r['inputs_mb']:.0f} MB)", flush=True)
    logits_mb = args.rows * args.vocab * 4 / 1e6
    print(f"\nmedians over {args.runs} run(s); {args.rows} rows x {args.vocab} classes: each "
          f"tensor of logits {logits_mb:.0f} MB")
    whole = {k: statistics.median(r[k] for r in results["none"]) for k in ("seconds", "peak_mb")}
    for chunk in settings:
        seconds = statistics.median(r["seconds"] for r in results[chunk])
        peak = statistics.median(r["peak_mb"] for r in results[chunk])
        print(f"  loss_chunk_rows={chunk:<5} {seconds:6.2f} s ({seconds / whole['seconds']:.2f}x)"
              f"   peak {peak:7.0f} MB ({peak / whole['peak_mb']:.2f}x)")


if __name__ == "__main__":
    main()
