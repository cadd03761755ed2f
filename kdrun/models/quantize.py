"""int8 students on the CPU: quantisation-aware training (QAT: the model trains with its
weights and activations fake-quantised, rounding in the forward pass and straight-through
gradients) and post-training quantisation (PTQ: a trained float model, its activation
ranges calibrated on training data), each converted to a model whose weights are int8
and whose linear layers and convolutions run int8 kernels.

It uses PyTorch's FX graph mode quantisation (``torch.ao.quantization.quantize_fx``) on
the x86 backend (fbgemm / oneDNN kernels): the converted model runs int8 in eager mode,
with no compiler, so it is timed and tested as it is deployed. PyTorch marks that API
deprecated in favour of torchao's pt2e flow, whose converted graph runs int8 only once
compiled by inductor with freezing (measured here: eager or plainly compiled, it ran
slower than float32, and freezing failed on a Conv1d model); this module is the one
place to change when torch drops the FX flow.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
from torch import nn

from kdrun.errors import ConfigError

ENGINES = ("x86", "fbgemm", "qnnpack")  # in order of preference on this CPU
INT8_SUFFIXES = ("_ptq", "_qat")  # roles of int8 students: scratch_ptq, distilled_qat, ...


@contextlib.contextmanager
def _quiet():
    """torch.ao's own deprecation and observer warnings, once per call, say nothing a
    user can act on (this module's docstring says why it uses the API)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        yield


def int8_engine() -> str:
    """The quantized engine this build of torch runs int8 kernels with, set as torch's."""
    supported = torch.backends.quantized.supported_engines
    engine = next((name for name in ENGINES if name in supported), None)
    if engine is None:
        raise ConfigError("student.quantize", "int8", f"this build of torch has no int8 CPU "
                          f"backend (engines: {', '.join(supported)}); use null")
    torch.backends.quantized.engine = engine
    return engine


def _fx():
    """torch.ao.quantization and its quantize_fx, or one line saying this torch lacks them."""
    try:
        with _quiet():
            from torch.ao import quantization
            from torch.ao.quantization import quantize_fx
    except ImportError as e:
        raise ConfigError("student.quantize", "int8", f"this torch has no FX quantisation "
                          f"(torch.ao.quantization: {e}); use null") from e
    return quantization, quantize_fx


def _example(input_shape) -> tuple[torch.Tensor]:
    """The example input FX traces a model with."""
    return (torch.zeros(2, *input_shape),)


class FakeQuantized(nn.Module):
    """A model prepared for quantisation-aware training. Its observers learn the
    activation ranges in training mode only: eval mode (every evaluation) freezes them,
    so validation and test data never move a range, and the int8 model converted after
    training computes what the fake-quantised one does in eval mode."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.graph = graph

    def forward(self, x):
        return self.graph(x)

    def train(self, mode: bool = True) -> FakeQuantized:
        quantization, _ = _fx()
        super().train(mode)
        self.graph.apply(quantization.enable_observer if mode else quantization.disable_observer)
        return self


def fake_quantized(model: nn.Module, input_shape) -> FakeQuantized:
    """``model`` prepared for quantisation-aware training (a copy; its weights kept)."""
    quantization, fx = _fx()
    mapping = quantization.get_default_qat_qconfig_mapping(int8_engine())
    with _quiet():
        graph = fx.prepare_qat_fx(copy.deepcopy(model).train(), mapping, _example(input_shape))
    return FakeQuantized(graph).train()


def to_int8(fake: FakeQuantized) -> nn.Module:
    """The int8 model of a fake-quantised one (a copy, in eval mode)."""
    _, fx = _fx()
    int8_engine()
    with _quiet():
        return fx.convert_fx(copy.deepcopy(fake).eval().graph)


@torch.no_grad()
def post_training_int8(model: nn.Module, input_shape, calibration) -> nn.Module:
    """A trained float32 model quantised to int8 (a copy), its activation ranges observed
    on ``calibration`` (an iterable of input batches)."""
    quantization, fx = _fx()
    mapping = quantization.get_default_qconfig_mapping(int8_engine())
    with _quiet():
        observed = fx.prepare_fx(copy.deepcopy(model).float().cpu().eval(), mapping,
                                 _example(input_shape))
        for batch in calibration:
            observed(batch.float().cpu())
        return fx.convert_fx(observed)


def _int8_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of a converted model that run int8 kernels, in order."""
    return [m for m in model.modules() if ".quantized" in type(m).__module__]


def int8_weights(model: nn.Module) -> list[torch.Tensor]:
    """The quantised weight of every int8 linear layer and convolution of a converted model."""
    return [m.weight() for m in _int8_layers(model) if callable(getattr(m, "weight", None))]


def output_step(model: nn.Module) -> float:
    """The quantisation step of a converted model's output: the scale of its last int8
    layer's output."""
    return float([m.scale for m in _int8_layers(model) if hasattr(m, "scale")][-1])


def is_int8(model: nn.Module) -> bool:
    """Whether a model holds int8 layers (a converted model: CPU only, not cast)."""
    return bool(_int8_layers(model))
