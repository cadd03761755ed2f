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


def token_rows(outputs: torch.Tensor | None, targets: torch.Tensor):
    """(outputs, targets) with each position a row; a classifier's unchanged."""
    if targets.ndim < 2:
        return outputs, targets
    rows = None if outputs is None else outputs.flatten(-3, -2)
    return rows, targets.flatten(-2)


def row_shapes(shapes, per_position: bool):
    """A tapped feature's shape per example, (positions, width), as the shape of one row,
    (width,), when the targets are per position (a list of shapes: each)."""
    if not per_position:
        return shapes
    return shapes[1:] if isinstance(shapes, tuple) else [s[1:] for s in shapes]


def feature_rows(features, targets: torch.Tensor):
    """A tapped feature (batch, positions, width), or a list of them, as one row per
    position, when the targets are per position; otherwise unchanged."""
    if features is None or targets.ndim < 2:
        return features
    flat = lambda f: f.flatten(0, 1) if f.shape[:2] == targets.shape else f  # noqa: E731
    return flat(features) if torch.is_tensor(features) else [flat(f) for f in features]
