"""Intermediate features read with forward hooks, by layer name, so that model code
never changes for a feature- or relation-based loss.

A layer is named as in ``model.named_modules()`` (``conv1``, ``fc0``, ...);
``penultimate`` means the input of the class head, the model's last linear layer
(the embedding the head sees). A list of names taps each (a loss that reads several
stages, e.g. ReviewKD), and gives a list of features in that order.
"""

from __future__ import annotations

import torch
from torch import nn

from kdrun.errors import ConfigError
from kdrun.models import eval_mode
from kdrun.precision import widen


class FeatureTap:
    """Keeps the latest output (or, for ``penultimate``, the head's input) of one layer,
    or of each layer of a list."""

    def __init__(self, model: nn.Module, layer: str | list[str], key: str = "layer"):
        self.single = isinstance(layer, str)
        self.layers = [layer] if self.single else [str(name) for name in layer]
        self._values: list[torch.Tensor | None] = [None] * len(self.layers)
        names = dict(model.named_modules())
        self._handles = []
        for i, name in enumerate(self.layers):
            if name == "penultimate":
                head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
                hook = head.register_forward_pre_hook(self._keeper(i, "input"))
            elif name in names and name:
                hook = names[name].register_forward_hook(self._keeper(i, "output"))
            else:
                valid = ", ".join(["penultimate"] + [n for n in names if n])
                raise ConfigError(key, name, f"not a layer of this model; valid: {valid}")
            self._handles.append(hook)

    def _keeper(self, i: int, which: str):
        def keep_input(module, inputs):
            self._values[i] = inputs[0]

        def keep_output(module, inputs, output):
            self._values[i] = output

        return keep_input if which == "input" else keep_output

    @property
    def value(self):
        """The latest feature, or the list of them for a list of layers."""
        return self._values[0] if self.single else list(self._values)

    def read_float(self):
        """``value`` in at least float32 (under autocast a feature may be bf16)."""
        return each_feature(widen, self.value)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def predict_features(model: nn.Module, split, layer: str | list[str], batch_size: int,
                     key: str = "layer"):
    """``layer``'s features for every example of ``split`` in order (a list of tensors
    for a list of layers), in eval mode without gradients, as the teacher's logits are
    computed once (kdrun/run/stages.py)."""
    tap = FeatureTap(model, layer, key)
    chunks = []
    with eval_mode(model):
        for _, xb, _ in split.batches(batch_size):
            model(xb)
            chunks.append(tap.read_float())
    tap.remove()
    if tap.single:
        return torch.cat(chunks)
    return [torch.cat(layer_chunks) for layer_chunks in zip(*chunks)]


def each_feature(fn, features):
    """``fn`` applied to a feature, or to each of a list of features (a list of layers)."""
    return fn(features) if torch.is_tensor(features) else [fn(f) for f in features]


def feature_shape(model: nn.Module, layer: str | list[str], input_shape, key: str):
    """The shape (without batch) of ``layer``'s feature for one input of ``input_shape``;
    a list of shapes for a list of layers."""
    tap = FeatureTap(model, layer, key)
    with eval_mode(model):
        weight = next(model.parameters())
        model(torch.zeros(1, *input_shape, device=weight.device, dtype=weight.dtype))
    tap.remove()
    return each_feature(lambda value: tuple(value.shape[1:]), tap.value)
