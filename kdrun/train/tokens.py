"""A sequence model's outputs as rows, one per token: what the losses, the meters and the
metrics read.

A language model gives (batch, positions, vocabulary) logits for (batch, positions)
targets (kdrun/data/text.py); every position is one next-token prediction. Flattened to
(batch * positions, vocabulary) and (batch * positions,), they are what a classifier's
(examples, classes) and (examples,) are, so every loss, the training meter, the
perplexity and the accuracy apply token by token unchanged. Leading dimensions (a stacked
group's members) are kept.
"""

from __future__ import annotations

import torch

from kdrun.data.labels import NO_LOSS


def token_rows(outputs: torch.Tensor | None, targets: torch.Tensor,
               keep: torch.Tensor | None = None):
    """(outputs, targets) with each position a row; a classifier's unchanged. ``keep``
    (instruction data, ``kept_rows``): only those rows, so that nothing downstream reads a
    prompt's or the padding's."""
    if targets.ndim < 2:
        return outputs, targets
    rows = None if outputs is None else outputs.flatten(-3, -2)
    targets = targets.flatten(-2)
    if keep is not None:
        rows, targets = (None if rows is None else rows[keep]), targets[keep]
    return rows, targets


def kept_rows(targets: torch.Tensor) -> torch.Tensor:
    """The rows (flattened positions) whose target is not NO_LOSS: found once per batch,
    for every tensor of it (a sync on a GPU, which only instruction data pays)."""
    return (targets.flatten() != NO_LOSS).nonzero().squeeze(1)


def has_no_loss_rows(targets: torch.Tensor) -> bool:
    """Whether some targets are NO_LOSS: a split of instruction data (checked once)."""
    return targets.ndim > 1 and bool((targets == NO_LOSS).any())


def row_shapes(shapes, per_position: bool):
    """A tapped feature's shape per example, (positions, width), as the shape of one row,
    (width,), when the targets are per position (a list of shapes: each)."""
    if not per_position:
        return shapes
    return shapes[1:] if isinstance(shapes, tuple) else [s[1:] for s in shapes]


def feature_rows(features, targets: torch.Tensor, keep: torch.Tensor | None = None):
    """A tapped feature (batch, positions, width), or a list of them, as one row per
    position, when the targets are per position (only the ``keep`` rows, as token_rows);
    otherwise unchanged."""
    if features is None or targets.ndim < 2:
        return features

    def flat(f):
        if f.shape[:2] != targets.shape:
            return f
        f = f.flatten(0, 1)
        return f if keep is None else f[keep]
    return flat(features) if torch.is_tensor(features) else [flat(f) for f in features]
