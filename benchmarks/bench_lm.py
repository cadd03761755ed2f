"""kdrun's token-level distillation step against a plain PyTorch loop, side by side in one
process.

Reference: a DataLoader over the token windows (batch 32, shuffled), on every step the
teacher's forward pass (eval mode, no grad), then Hinton's KD written out over every
position: alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE. kdrun: the same windows as
tensors on the device, the teacher's logits computed once (timed separately) and looked up
per batch, its loss on the positions as rows (kdrun/train/tokens.py). Same models
(transformers GPT-2 built from config: teacher 2x64, student 1x32, both from one seed),
data (text_lm's generated text), batch, Adam lr 3e-3 and loss.

Prints the median training seconds per epoch of each, the ratio reference / kdrun, tokens
per second, and the peak memory during each (resident set on CPU, allocated on CUDA),
with the cached logits' size: tokens x vocabulary x 4 bytes.

    python benchmarks/bench_lm.py [--epochs 3] [--device auto] [--sentences 3000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from benchmarks.bench_kd import PeakMemory, device_name, kdrun_epochs  # noqa: E402
from kdrun.data import Data, Split  # noqa: E402
from kdrun.data.metrics import PERPLEXITY  # noqa: E402
from kdrun.data.text import text_lm  # noqa: E402
from kdrun.losses import KD  # noqa: E402
from kdrun.models import build_model  # noqa: E402
from kdrun.run.pipeline import pick_device  # noqa: E402
from kdrun.train.targets import CachedLogits, predict_logits  # noqa: E402

TEACHER = {"arch": "hf_lm", "family": "gpt2", "layers": 2, "width": 64, "heads": 4}
STUDENT = {"arch": "hf_lm", "family": "gpt2", "layers": 1, "width": 32, "heads": 4}
BATCH, LR, T, ALPHA = 32, 3e-3, 2.0, 0.5


def model(spec: dict, data: Data, device) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(OmegaConf.create(spec), data.input_shape, data.num_classes).to(device)


def reference_stage(data: Data, net, teacher, device, epochs: int) -> list[float]:
    """A plain loop: DataLoader batches, the teacher on every step, KD written out."""
    loader = DataLoader(TensorDataset(data.train.x, data.train.y), batch_size=BATCH,
                        shuffle=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    teacher.eval()
    seconds = []
    for _ in range(epochs):
        net.train()
        t0 = time.perf_counter()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                t_logits = teacher(x).flatten(0, 1)
            s_logits = net(x).flatten(0, 1)
            kl = F.kl_div(F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1),
                          reduction="batchmean", log_target=True)
            loss = ALPHA * T**2 * kl + (1 - ALPHA) * F.cross_entropy(s_logits, y.flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per stage (median taken)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--sentences", type=int, default=3000, help="generated sentences")
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()
    device = pick_device(args.device)
    name = device_name(device)
    raw = text_lm(sentences=args.sentences, seq_len=args.seq_len)
    half = len(raw.y_test) // 2
    data = Data("text_lm", Split(raw.x_train, raw.y_train),
                Split(raw.x_test[:half], raw.y_test[:half]),
                Split(raw.x_test[half:], raw.y_test[half:]), raw.num_classes, metric=PERPLEXITY)
    tokens = data.train.y.numel()
    print(f"device: {name}; torch {torch.__version__}; {len(data.train)} windows of "
          f"{args.seq_len} tokens ({tokens} tokens), batch {BATCH}, {args.epochs} epochs, medians")
    teacher = model(TEACHER, data, device)
    with PeakMemory(device) as ref_mem:
        ref = reference_stage(data, model(STUDENT, data, device), teacher, device, args.epochs)
    with PeakMemory(device) as our_mem:
        t0 = time.perf_counter()
        targets = CachedLogits(predict_logits(teacher, data.train.x.to(device), 256))
        logits_s = time.perf_counter() - t0
        ours = kdrun_epochs(data, model(STUDENT, data, device), KD(T=T, alpha=ALPHA), device,
                            args.epochs, targets, BATCH, LR, 256)
    ref_s, our_s = statistics.median(ref), statistics.median(ours)
    cache_mb = targets.logits.numel() * targets.logits.element_size() / 1e6
    print(f"reference loop  {ref_s:7.2f} s/epoch  {tokens / ref_s:9.0f} tokens/s  "
          f"peak {ref_mem.peak_mb:7.0f} MB")
    print(f"kdrun           {our_s:7.2f} s/epoch  {tokens / our_s:9.0f} tokens/s  "
          f"peak {our_mem.peak_mb:7.0f} MB  (+ teacher logits once: {logits_s:.2f} s, "
          f"{cache_mb:.0f} MB)")
    print(f"speed-up {ref_s / our_s:.2f}x, memory ratio kdrun / reference "
          f"{our_mem.peak_mb / ref_mem.peak_mb:.2f}")


if __name__ == "__main__":
    main()
