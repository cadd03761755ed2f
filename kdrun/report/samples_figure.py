"""samples.png: what a data-free student learned from (scheme=data_free), the generator's
inputs at each kept step, drawn as images or as curves."""

from __future__ import annotations

from pathlib import Path

import torch

from kdrun.store.files import atomic_write

ROWS_SHOWN = 8  # snapshots drawn, evenly spread over those kept


def draw_samples(path: Path, kept: dict) -> None:
    """One row per snapshot (its generator step on the left), one column per sample: an
    image for inputs (C, H, W) of 1 or 3 channels, else a curve per channel; nothing to
    draw (no snapshot kept) writes nothing."""
    samples, steps = kept["samples"], kept["sample_steps"]
    if not samples:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = sorted({round(i * (len(samples) - 1) / max(ROWS_SHOWN - 1, 1))
                     for i in range(min(ROWS_SHOWN, len(samples)))})
    columns = len(samples[0])
    fig, axes = plt.subplots(len(chosen), columns, squeeze=False,
                             figsize=(1.3 * columns, 1.1 * len(chosen) + 0.4))
    for row, index in zip(axes, chosen):
        for ax, x in zip(row, samples[index]):
            _draw_one(ax, x)
        row[0].set_ylabel(f"step {steps[index]}", fontsize=7)
    fig.suptitle("data-free student: the generator's inputs it learned from", fontsize=9)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)


def _draw_one(ax, x: torch.Tensor) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if x.ndim == 3 and x.shape[0] in (1, 3):
        image = x.permute(1, 2, 0)
        image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
        ax.imshow(image.squeeze(-1).numpy(), cmap="gray" if x.shape[0] == 1 else None)
        return
    for channel in x.reshape(x.shape[0] if x.ndim > 1 else 1, -1):
        ax.plot(channel.numpy(), linewidth=0.8)
