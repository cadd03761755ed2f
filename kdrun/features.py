"""Intermediate features read with forward hooks, by layer name, so that model code
never changes for a feature- or relation-based loss.

A layer is named as in ``model.named_modules()`` (``conv1``, ``fc0``, ...);
``penultimate`` means the input of the class head, the model's last linear layer
(the embedding the head sees).
"""

from __future__ import annotations

import torch
from torch import nn

from kdrun.errors import ConfigError
from kdrun.models import eval_mode


class FeatureTap:
    """Keeps the latest output (or, for ``penultimate``, the head's input) of one layer."""

    def __init__(self, model: nn.Module, layer: str, key: str = "layer"):
        self.value: torch.Tensor | None = None
        names = dict(model.named_modules())
        if layer == "penultimate":
            head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
            self._handle = head.register_forward_pre_hook(self._keep_input)
        elif layer in names and layer:
            self._handle = names[layer].register_forward_hook(self._keep_output)
        else:
            valid = ", ".join(["penultimate"] + [n for n in names if n])
            raise ConfigError(key, layer, f"not a layer of this model; valid: {valid}")

    def _keep_input(self, module, inputs):
        self.value = inputs[0]

    def _keep_output(self, module, inputs, output):
        self.value = output

    def remove(self) -> None:
        self._handle.remove()


def feature_shape(model: nn.Module, layer: str, input_shape, key: str) -> tuple[int, ...]:
    """The shape (without batch) of ``layer``'s feature for one input of ``input_shape``."""
    tap = FeatureTap(model, layer, key)
    with eval_mode(model):
        model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    tap.remove()
    return tuple(tap.value.shape[1:])
