"""Intermediate features read with forward hooks, by layer name, so that model code
never changes for a feature- or relation-based loss.

A layer is named as in ``model.named_modules()`` (``conv1``, ``fc0``, ...);
``penultimate`` means the input of the class head, the model's last linear layer
(the embedding the head sees); a model may also name taps of its own in a
``preact_taps`` dict, e.g. the CIFAR zoo's ``layer1.preact``: the stage's output before
its final ReLU, as the references' ``preact=True`` reads it. A list of names taps each
(a loss that reads several stages, e.g. ReviewKD), and gives a list of features in that
order.
"""

from __future__ import annotations

import torch
from torch import nn

from kdrun.errors import ConfigError
from kdrun.models import eval_mode, example_inputs
from kdrun.precision import widen
from kdrun.train.tokens import row_shapes


class FeatureTap:
    """Keeps the latest output (or, for ``penultimate``, the head's input) of one layer,
    or of each layer of a list."""

    def __init__(self, model: nn.Module, layer: str | list[str], key: str = "layer"):
        self.single = isinstance(layer, str)
        self.layers = [layer] if self.single else [str(name) for name in layer]
        self._values: list[torch.Tensor | None] = [None] * len(self.layers)
        self._versions: list[int | None] = [None] * len(self.layers)
        self._key = key
        names = dict(model.named_modules())
        aliases = getattr(model, "preact_taps", {})
        self._handles = []
        for i, name in enumerate(self.layers):
            module = aliases.get(name, name)
            if name == "penultimate":
                head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
                hook = head.register_forward_pre_hook(self._keeper(i, "input"))
            elif module in names and module:
                # a model's own tap may be a batch norm whose ReLU works in place: a copy
                keeper = self._keeper(i, "copy" if name in aliases else "output")
                hook = names[module].register_forward_hook(keeper)
            else:
                valid = ", ".join(["penultimate", *aliases] + [n for n in names if n])
                raise ConfigError(key, name, f"not a layer of this model; valid: {valid}")
            self._handles.append(hook)

    def _keeper(self, i: int, which: str):
        def keep_input(module, inputs):
            self._values[i] = inputs[0]

        def keep_output(module, inputs, output):
            self._values[i] = output
            self._versions[i] = output._version

        def keep_copy(module, inputs, output):
            self._values[i] = output.clone()

        return {"input": keep_input, "output": keep_output, "copy": keep_copy}[which]

    @property
    def value(self):
        """The latest feature, or the list of them for a list of layers."""
        for name, kept, version in zip(self.layers, self._values, self._versions):
            if version is not None and kept._version != version:
                raise ConfigError(self._key, name, "this layer's output is overwritten in place "
                                  "by the next one (an in-place ReLU) before it can be read: "
                                  "tap the layer after it, or the stage it belongs to")
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
    computed once (kdrun/train/targets.py)."""
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
        model(example_inputs(model, 1, input_shape, weight.device, weight.dtype, fill=0.0))
    tap.remove()
    return each_feature(lambda value: tuple(value.shape[1:]), tap.value)


def feature_shapes(loss, student: nn.Module, teacher: nn.Module, input_shape,
                   per_position: bool = False, teacher_shape=None):
    """The shapes of the layers a feature loss reads, student's and teacher's (whose input
    is ``teacher_shape`` where it reads another view): of one row's when the targets are
    per position (a language model)."""
    return (row_shapes(feature_shape(student, loss.student_layer, input_shape,
                                     "loss.student_layer"), per_position),
            row_shapes(feature_shape(teacher, loss.teacher_layer, teacher_shape or input_shape,
                                     "loss.teacher_layer"), per_position))
