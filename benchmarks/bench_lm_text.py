"""kdrun's language-model training on real text against a plain loop that does what
nanoGPT's train.py does, side by side in one process.

The setting is nanoGPT's README for a CPU (config/train_shakespeare_char.py with
--block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
--lr_decay_iters=2000 --dropout=0.0): both train the same model (transformers' GPT-2, 4
layers, 4 heads, 128 wide, context 64, byte tokens: 256; built from one seed) on the
first 90% of the text, 2000 optimiser steps of 12 windows of 64 tokens (1.54M tokens),
AdamW at lr 1e-3 with betas (0.9, 0.99) and weight decay 0.1, 100 warm-up steps then a
cosine to 1e-4, the gradient norm clipped at 1.0, float32 on a CPU.

The plain loop draws 12 windows at random offsets of the training text per step, as
train.py's get_batch, and decays only the matrices, as its configure_optimizers. kdrun
cuts the training text into disjoint windows and runs whole epochs over as many of them
(a random subset, split.max_train) as make the same number of steps; its AdamW decays
every parameter (kdrun has no per-parameter decay groups); per-step schedule as the
trainer config says (schedule_unit: step).

Speed: ``--rounds`` rounds, each the plain loop's ``--speed-steps`` steps then kdrun's
(one epoch of as many windows), alternated so that a busy spell of the machine falls on
both; tokens per second over the training steps (evaluations excluded), per round and
their medians, and the median of the per-round ratios. Loss: both loops over the whole
budget, and the mean next-byte cross-entropy (nats) of both models on every disjoint
window of the held-out last 10% of the text at each of kdrun's epoch ends.

    python benchmarks/bench_lm_text.py [--text input.txt] [--iters 2000] [--rounds 5]

Without --text the text is generated (the grammar of kdrun/data/text.py), offline.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from benchmarks.bench_kd import device_name  # noqa: E402
from kdrun.data import load_data  # noqa: E402
from kdrun.data.text import grammar_text  # noqa: E402
from kdrun.losses import CE  # noqa: E402
from kdrun.models import build_model  # noqa: E402
from kdrun.run.pipeline import pick_device  # noqa: E402
from kdrun.train.fit import fit  # noqa: E402
from kdrun.train.optim import per_step_factor  # noqa: E402

MODEL = {"arch": "hf_lm", "family": "gpt2", "layers": 4, "width": 128, "heads": 4,
         "dropout": 0.0, "name": None}
BATCH, BLOCK, LR, MIN_LR, WARMUP, DECAY, BETAS, CLIP = 12, 64, 1e-3, 1e-4, 100, 0.1, \
    (0.9, 0.99), 1.0


def compose(text: Path, windows: int, epochs: int):
    """The kdrun config of the comparison: its data and trainer."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    import kdrun.cli.main  # noqa: F401  (kdrun's resolvers)

    with initialize_config_module("kdrun.configs", version_base="1.3"):
        return hydra_compose("config", overrides=[
            "dataset=text_lm", f"dataset.files={text}", f"dataset.seq_len={BLOCK}",
            "split.val_fraction=0", f"split.max_train={windows}",
            "trainer.optimizer=adamw", f"trainer.lr={LR}", f"trainer.weight_decay={DECAY}",
            f"trainer.betas=[{BETAS[0]},{BETAS[1]}]", "trainer.schedule=cosine",
            "trainer.schedule_unit=step", f"trainer.warmup_steps={WARMUP}",
            f"trainer.min_lr={MIN_LR}", f"trainer.grad_clip={CLIP}",
            f"trainer.batch_size={BATCH}", f"trainer.epochs={epochs}",
            "trainer.eval_batch_size=256"])


def model(vocab: int, device) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(OmegaConf.create(MODEL), (BLOCK,), vocab).to(device)


@torch.no_grad()
def held_out_loss(net, split, device) -> float:
    """Mean next-token cross-entropy (nats) over every window of ``split``."""
    net.eval()
    total, count = 0.0, 0
    for x, y in zip(split.x.split(256), split.y.split(256)):
        logits = net(x.to(device)).float()
        total += F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(),
                                 reduction="sum").item()
        count += y.numel()
    net.train()
    return total / count


def plain_loop(tokens: torch.Tensor, vocab: int, steps: int, checkpoints: list[int], test,
               device) -> tuple[list[float], dict[int, float]]:
    """nanoGPT's train.py loop: per-step seconds, and the held-out loss at ``checkpoints``."""
    net = model(vocab, device)
    decay = [p for p in net.parameters() if p.dim() >= 2]
    no_decay = [p for p in net.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=LR,
                                  betas=BETAS)
    draws = torch.Generator().manual_seed(0)
    seconds, losses = [], {}
    net.train()
    for step in range(steps):
        t0 = time.perf_counter()
        offsets = torch.randint(len(tokens) - BLOCK, (BATCH,), generator=draws)
        x = torch.stack([tokens[i:i + BLOCK] for i in offsets]).to(device)
        y = torch.stack([tokens[i + 1:i + 1 + BLOCK] for i in offsets]).to(device)
        for group in optimizer.param_groups:
            group["lr"] = LR * per_step_factor("cosine", steps, WARMUP, MIN_LR / LR, step)
        loss = F.cross_entropy(net(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        if step + 1 in checkpoints:
            losses[step + 1] = held_out_loss(net, test, device)
    return seconds, losses


def kdrun_loop(data, cfg, device) -> tuple[list[float], dict[int, float]]:
    """kdrun's fit() (the loop of every stage): per-epoch training seconds, and the
    held-out loss at each epoch's end."""
    net = model(data.num_classes, device)
    steps_per_epoch = math.ceil(len(data.train) / BATCH)
    seconds, losses = [], {}

    def on_epoch(rows, snapshot):
        seconds.append(rows[0]["seconds"])
        losses[rows[0]["epoch"] * steps_per_epoch] = held_out_loss(net, data.test, device)
    fit(net, data, CE(), cfg.trainer, stage="bench", epochs=cfg.trainer.epochs, seed=0,
        device=device, progress=False, on_epoch=on_epoch)
    return seconds, losses


def speed(train_text: torch.Tensor, text: Path, rounds: int, steps: int, device) -> None:
    """Tokens per second of both loops, alternated over ``rounds``."""
    cfg = compose(text, steps * BATCH, 1)
    cfg.split.max_test = 16  # its evaluation after the epoch: not timed, kept short
    data = load_data(cfg.dataset, cfg.split)
    tokens = steps * BATCH * BLOCK
    plain, ours = [], []
    for r in range(rounds):
        plain.append(tokens / sum(plain_loop(train_text, data.num_classes, steps, [], None,
                                             device)[0]))
        ours.append(tokens / sum(kdrun_loop(data, cfg, device)[0]))
        print(f"  round {r + 1}: plain {plain[-1]:,.0f}, kdrun {ours[-1]:,.0f} tokens/s "
              f"({ours[-1] / plain[-1]:.2f}x)")
    ratio = statistics.median(o / p for o, p in zip(ours, plain))
    print(f"tokens per second, median of {rounds} rounds of {steps} steps: plain loop "
          f"(nanoGPT's train.py) {statistics.median(plain):,.0f}, kdrun (fit, the loop of "
          f"every stage) {statistics.median(ours):,.0f}; kdrun / plain {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, help="a UTF-8 text file (default: generated)")
    parser.add_argument("--iters", type=int, default=2000, help="optimiser steps of each")
    parser.add_argument("--rounds", type=int, default=5, help="alternated speed rounds")
    parser.add_argument("--speed-steps", type=int, default=200, help="steps of a round")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args()
    device = pick_device(args.device)
    text = args.text
    if text is None:  # enough generated text for the steps' windows, one epoch
        text = Path(tempfile.mkdtemp()) / "generated.txt"
        text.write_text(grammar_text(args.iters * BATCH * BLOCK // 30, seed=0))
    wanted = args.iters * BATCH  # windows of the token budget
    everything = compose(text, 10**9, 1)
    epochs = math.ceil(wanted / len(load_data(everything.dataset, everything.split).train))
    cfg = compose(text, wanted // epochs, epochs)
    data = load_data(cfg.dataset, cfg.split)
    steps = epochs * math.ceil(len(data.train) / BATCH)
    raw = torch.tensor(list(Path(text).read_bytes()), dtype=torch.long)
    train_text = raw[: int(len(raw) * 0.9)]
    print(f"text: {text} ({len(raw):,} bytes; training on the first 90%, held out: "
          f"{len(data.test):,} windows of the last 10%), device {device_name(device)}, "
          f"GPT-2 4x128, {steps} steps of {BATCH}x{BLOCK} tokens "
          f"({steps * BATCH * BLOCK / 1e6:.2f}M); kdrun: {epochs} epochs of "
          f"{len(data.train):,} windows")
    speed(train_text, text, args.rounds, min(args.speed_steps, steps), device)
    checkpoints = [e * math.ceil(len(data.train) / BATCH) for e in range(1, epochs + 1)]
    plain_seconds, plain_losses = plain_loop(train_text, data.num_classes, steps,
                                             checkpoints, data.test, device)
    ours_seconds, ours_losses = kdrun_loop(data, cfg, device)
    tokens = steps * BATCH * BLOCK
    print(f"the whole budget: plain loop {tokens / sum(plain_seconds):,.0f} tokens/s, kdrun "
          f"{tokens / sum(ours_seconds):,.0f} ({sum(plain_seconds) / sum(ours_seconds):.2f}x)")
    print("held-out cross-entropy (nats per byte) after | plain | kdrun")
    for step in checkpoints:
        print(f"  {step} steps ({step * BATCH * BLOCK / 1e6:.2f}M tokens) | "
              f"{plain_losses[step]:.3f} | {ours_losses[step]:.3f}")


if __name__ == "__main__":
    main()
