"""Model builders, registered by name in MODELS.

A builder takes the data's ``input_shape`` (without the batch dimension) and
``num_classes``, plus the keys of its ``configs/teacher|student/*.yaml`` file.
Layers are named (``conv0``, ``fc1``, ``head``, ...) so later losses can tap
intermediate features by name. To add a model: write its builder here with
``@MODELS.register("name")`` and add a YAML file with ``arch: <name>``; or keep the
builder in your own package and write its import path as ``arch``.

A builder may also carry, as attributes, what kdrun asks of models made outside it
(kdrun/models/hubs/timm_zoo.py, kdrun/models/hubs/torchvision_zoo.py): ``check(model_cfg, prefix)``
(validation before anything trains), ``identity(model_cfg)`` (what a stage key holds
besides the config: library version, weights' hash), ``input_spec(model_cfg)`` (the
input its weights expect) and ``describe(model_cfg)`` (its name in the table).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdrun.checks import boolean, int_or_ints, number, one_of, positive_ints
from kdrun.errors import ConfigError, DataError
from kdrun.registry import Registry

# name -> builder(input_shape, num_classes, **keys); a config may also name a function
# of your own package by its import path (arch: mypackage.models.tiny_cnn)
MODELS = Registry("model", hidden=("cohort",))  # a cohort is built by scheme=dml


def example_inputs(model: nn.Module, batch: int, input_shape, device=None, dtype=None,
                   fill: float | None = None):
    """Inputs to time, trace or probe ``model`` with: its own ``example_inputs(batch,
    device)`` where it has one (a language model's token ids, drawn from no generator),
    else random floats, or ``fill`` everywhere (a probe that must leave the global random
    state as it found it: it decides the next model's initialisation)."""
    own = getattr(model, "example_inputs", None)
    if own is not None:
        return own(batch, device)
    if fill is not None:
        return torch.full((batch, *input_shape), fill, device=device, dtype=dtype)
    return torch.randn(batch, *input_shape, device=device, dtype=dtype)


def _as_list(value, n: int) -> list:
    """An int (used for every layer) or a list with one entry per layer."""
    if isinstance(value, int | str) or value is None:
        return [value] * n
    if len(value) != n:
        raise ValueError(f"expected one value per layer ({n}), got {list(value)}")
    return list(value)


DROPOUT = number(0, 1, hi_open=True)


@MODELS.register("mlp", rules={"hidden": lambda v: None if v == [] else positive_ints(v),
                               "dropout": DROPOUT})
def mlp(input_shape, num_classes, hidden: Sequence[int] = (100, 100), dropout: float = 0.0):
    """Fully connected ReLU network on the flattened input."""
    layers = OrderedDict(flatten=nn.Flatten())
    width = math.prod(input_shape)
    for i, h in enumerate(hidden):
        layers[f"fc{i}"] = nn.Linear(width, h)
        layers[f"relu{i}"] = nn.ReLU()
        if dropout > 0:
            layers[f"drop{i}"] = nn.Dropout(dropout)
        width = h
    layers["head"] = nn.Linear(width, num_classes)
    return nn.Sequential(layers)


@MODELS.register("cnn", rules={
    "channels": positive_ints, "kernel_size": int_or_ints, "stride": int_or_ints,
    "pool": one_of("none", "max", "avg"), "global_pool": number(1, integer=True, optional=True),
    "hidden": lambda v: None if v == [] else positive_ints(v), "dropout": DROPOUT,
    "batch_norm": boolean})
def cnn(
    input_shape,
    num_classes,
    channels: Sequence[int] = (25, 25, 25),
    kernel_size: int | Sequence[int] = 3,
    stride: int | Sequence[int] = 1,
    pool: str = "none",
    global_pool: int | None = None,
    hidden: Sequence[int] = (),
    dropout: float = 0.0,
    batch_norm: bool = False,
):
    """Convolutional network: Conv1d for sequences (C, L), Conv2d for images (C, H, W).

    Each conv block is conv -> [batchnorm] -> ReLU -> [max/avg pool by 2]; then an
    optional adaptive average pool to ``global_pool`` cells per spatial dim, a
    flatten, optional dense ``hidden`` layers, and the class head. ``features`` (an
    identity) marks the last feature map for feature-based losses.
    """
    if len(input_shape) not in (2, 3):
        raise DataError(
            f"a cnn needs sequence (C, L) or image (C, H, W) inputs; this data set has "
            f"flat features of shape {tuple(input_shape)}: use an mlp"
        )
    layers = _conv_blocks(input_shape, channels, kernel_size, stride, pool, batch_norm)
    layers["features"] = nn.Identity()  # the last feature map, a tap point for feature losses
    if global_pool:
        adaptive = nn.AdaptiveAvgPool2d if len(input_shape) == 3 else nn.AdaptiveAvgPool1d
        layers["global_pool"] = adaptive(global_pool)
    layers["flatten"] = nn.Flatten()
    width = _flat_width(nn.Sequential(layers), input_shape)
    for i, h in enumerate(hidden):
        layers[f"fc{i}"] = nn.Linear(width, h)
        layers[f"relu_fc{i}"] = nn.ReLU()
        width = h
    if dropout > 0:
        layers["drop"] = nn.Dropout(dropout)
    layers["head"] = nn.Linear(width, num_classes)
    return nn.Sequential(layers)


def _conv_blocks(input_shape, channels, kernel_size, stride, pool: str,
                 batch_norm: bool) -> OrderedDict:
    """A cnn's conv blocks, conv -> [batchnorm] -> ReLU -> [max/avg pool by 2], 1-D or 2-D
    as the inputs are."""
    two_d = len(input_shape) == 3
    Conv = nn.Conv2d if two_d else nn.Conv1d
    Norm = nn.BatchNorm2d if two_d else nn.BatchNorm1d
    Pools = {"max": nn.MaxPool2d if two_d else nn.MaxPool1d,
             "avg": nn.AvgPool2d if two_d else nn.AvgPool1d}
    n = len(channels)
    layers = OrderedDict()
    width = input_shape[0]
    for i, (c, k, s) in enumerate(zip(channels, _as_list(kernel_size, n), _as_list(stride, n))):
        layers[f"conv{i}"] = Conv(width, c, k, stride=s, padding=k // 2)
        if batch_norm:
            layers[f"bn{i}"] = Norm(c)
        layers[f"relu{i}"] = nn.ReLU()
        if pool != "none":
            layers[f"pool{i}"] = Pools[pool](2)
        width = c
    return layers


def _flat_width(body: nn.Module, input_shape) -> int:
    """The width of the flattened features ``body`` makes of one input."""
    with torch.no_grad():
        try:
            return body(torch.zeros(1, *input_shape)).shape[1]
        except ValueError:  # batch norm on 1x1 maps: one example has a single value per
            # channel, too few in training mode. Only then probe in eval mode, from fresh
            # statistics (probing so always would change the running statistics every
            # other model starts from, and the cached stages that started from them)
            for module in body.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.reset_running_stats()
            width = body.eval()(torch.zeros(1, *input_shape)).shape[1]
            body.train()
            return width


def need_images(input_shape, name: str) -> None:
    if len(input_shape) != 3:
        raise DataError(f"a {name} needs images (C, H, W); this data set has inputs of shape "
                        f"{tuple(input_shape)}: use an mlp or a cnn")


def image_builder(name: str, make, doc: str):
    """A builder for a model of images only (the CIFAR zoo): ``make(channels,
    num_classes)``."""

    def build(input_shape, num_classes):
        need_images(input_shape, name)
        return make(input_shape[0], num_classes)

    build.__doc__ = doc
    return build


def he_init(model: nn.Module, linear_std: float | None = None) -> None:
    """The CIFAR zoo's references' initialisation: every convolution He-normal over its
    fan-out, its bias (if any) zero; with ``linear_std``, every linear layer N(0,
    linear_std) with a zero bias (else torch's default). Batch norm keeps torch's 1, 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


@MODELS.register("dsconv", rules={"base": number(1, integer=True), "multipliers": positive_ints,
                                  "pool_blocks": number(0, integer=True)})
def dsconv(input_shape, num_classes, base: int = 16,
           multipliers: Sequence[int] = (1, 2, 4, 8, 16, 16, 16, 16), pool_blocks: int = 3):
    """Depthwise-separable CNN (Howard et al. 2017, MobileNets), as the food-11 seed's
    StudentNet(base=16): a 3x3 conv to ``base`` channels, then blocks of depthwise 3x3
    conv -> BN -> ReLU6 -> pointwise 1x1 conv to ``base * multipliers[i+1]`` channels,
    max-pooled by 2 after the first ``pool_blocks`` blocks, a global average pool and
    the class head."""
    need_images(input_shape, "dsconv")
    widths = [base * m for m in multipliers]
    layers = OrderedDict(conv0=nn.Conv2d(input_shape[0], widths[0], 3, 1, 1),
                         bn0=nn.BatchNorm2d(widths[0]), relu0=nn.ReLU6(), pool0=nn.MaxPool2d(2))
    for i, (w_in, w_out) in enumerate(zip(widths, widths[1:]), start=1):
        layers[f"dw{i}"] = nn.Conv2d(w_in, w_in, 3, 1, 1, groups=w_in)
        layers[f"bn{i}"] = nn.BatchNorm2d(w_in)
        layers[f"relu{i}"] = nn.ReLU6()
        layers[f"pw{i}"] = nn.Conv2d(w_in, w_out, 1)
        if i < pool_blocks:
            layers[f"pool{i}"] = nn.MaxPool2d(2)
    layers["features"] = nn.Identity()
    layers["global_pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["head"] = nn.Linear(widths[-1], num_classes)
    return nn.Sequential(layers)


class Cohort(nn.Module):
    """Students trained together (deep mutual learning). ``forward`` returns the first
    member's logits, the one the run reports and deploys, and keeps every member's
    logits in ``outputs`` for the mutual loss."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.outputs: list[torch.Tensor] = []

    @property
    def deployed(self) -> nn.Module:
        return self.members[0]

    def forward(self, x):
        self.outputs = [member(x) for member in self.members]
        return self.outputs[0]


@MODELS.register("cohort", rules={"size": number(2, integer=True)})
def cohort(input_shape, num_classes, size: int = 2, member=None):
    """``size`` students of the architecture ``member`` (a student config), each built
    in turn from the current random state: member 1 gets the init a lone student
    built from the same seed would get."""
    from omegaconf import OmegaConf

    member = OmegaConf.create(member)
    return Cohort([build_model(member, input_shape, num_classes) for _ in range(size)])



NOT_BUILDER_KEYS = ("arch", "checkpoint", "quantize")  # config keys that are not builder arguments


def model_builder(arch: str, key: str = "arch"):
    """The builder ``arch`` names: a registered name or a function's import path."""
    return MODELS.get(arch, key) if arch != "cohort" else cohort


def build_model(model_cfg, input_shape, num_classes: int, role: str = "model",
                graph=None) -> nn.Module:
    """Build ``model_cfg.arch`` for this data; ``role`` (teacher/student) names errors. A
    model that reads a graph (kdrun/models/graph.py) is given the ``graph`` its inputs,
    node ids, index."""
    params = {k: v for k, v in dict(model_cfg).items() if k not in NOT_BUILDER_KEYS}
    builder = model_builder(model_cfg.arch)
    if getattr(builder, "reads_graph", False):
        if graph is None:
            raise ConfigError(f"{role}.arch", model_cfg.arch, "it reads a graph: give it a "
                              "graph's node ids (dataset=csbm or dataset=planetoid, its view "
                              "graph), or use a model of node features (mlp)")
        params["graph"] = graph
    try:
        return builder(tuple(input_shape), num_classes, **params)
    except RuntimeError as e:  # e.g. the input shrinks to nothing after too many strided convs
        raise ConfigError(
            f"{role}", model_cfg.arch,
            f"cannot be built for input shape {tuple(input_shape)} ({str(e).splitlines()[0]})",
        ) from e


def loads_weights(model_cfg) -> bool:
    """Whether building ``model_cfg`` reads weights: a zoo's pretrained ones, a weights
    file, or a builder's own (its ``loads_weights`` hook, e.g. hf_lm's ``name``)."""
    own = builder_hook(model_cfg, "loads_weights")
    if own is not None:
        return bool(own(model_cfg))
    return bool(model_cfg.get("pretrained") or model_cfg.get("weights"))


def meta_model(model_cfg, input_shape, num_classes: int) -> nn.Module | None:
    """The model built on the meta device, to look at (its layers, its cost): no memory,
    no random draws, nothing read; None for a model that starts from weights or cannot
    be built that way."""
    if loads_weights(model_cfg):
        return None
    try:
        with torch.device("meta"):
            return build_model(model_cfg, input_shape, num_classes)
    except (RuntimeError, NotImplementedError, ValueError, ConfigError):
        return None  # the real build, later, says what is wrong with a config


def meta_architecture(model_cfg, input_shape, num_classes: int) -> nn.Module | None:
    """The model's architecture on the meta device, even for one that starts from weights
    (a builder's ``meta_build`` hook reads only its config file; a zoo's model is built
    without its weights), to count its parameters and activations before anything is
    allocated; None where it cannot be built that way."""
    hook = builder_hook(model_cfg, "meta_build")
    if hook is None and loads_weights(model_cfg):  # the same layers, without the weights
        plain = dict(model_cfg)
        unset = {"pretrained": False, "weights": None}
        model_cfg = OmegaConf.create({**plain, **{k: v for k, v in unset.items() if k in plain}})
    try:
        with torch.device("meta"):
            built = hook(model_cfg, input_shape, num_classes) if hook else None
            return built if built is not None else build_model(model_cfg, input_shape,
                                                               num_classes)
    except (RuntimeError, NotImplementedError, ValueError, TypeError, OSError, ConfigError):
        return None  # the real build, later, says what is wrong with a config


def forward_mflop(model_cfg, input_shape, num_classes: int, batch: int) -> float | None:
    """MFLOP of one forward pass on ``batch`` examples (the matrix products, convolutions
    and attention torch's FlopCounterMode counts) of the model built on the meta device:
    no memory, no random draws, nothing read. None when it cannot be known that way: a
    model that starts from weights, or whose forward needs real values."""
    model = meta_model(model_cfg, input_shape, num_classes)
    if model is None:
        return None
    meta = torch.device("meta")
    try:
        inputs = example_inputs(model, batch, input_shape, meta, torch.float32)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(inputs)
    except (RuntimeError, NotImplementedError, ValueError, ConfigError):
        return None  # the real build, later, says what is wrong with a config
    return counter.get_total_flops() / 1e6


@contextmanager
def eval_mode(model: nn.Module):
    """Dropout off and batch-norm statistics frozen inside the block, and no gradients;
    the model's own mode comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def builder_hook(model_cfg, hook: str):
    """The builder's ``hook`` (check, identity, input_spec, describe), or None."""
    if model_cfg.get("arch") is None:
        return None
    return getattr(model_builder(str(model_cfg.arch)), hook, None)


def model_identity(model_cfg) -> dict:
    """What a stage key holds about a model besides its config (e.g. the hash of the
    pretrained weights it starts from): empty for kdrun's own models."""
    identity = builder_hook(model_cfg, "identity")
    return identity(model_cfg) if identity else {}


def input_spec(model_cfg):
    """The input a zoo model's weights expect (a ``kdrun.models.hubs.pretrained.InputSpec``),
    or None."""
    spec = builder_hook(model_cfg, "input_spec")
    return spec(model_cfg) if spec is not None else None


def describe(model_cfg) -> str:
    """A short name such as ``mlp[100,100]``, ``cnn[32,32]+fc[128]`` or ``dsconv[16]``."""
    own = builder_hook(model_cfg, "describe")
    if own is not None:
        return own(model_cfg)
    if model_cfg.arch == "dsconv":
        return f"dsconv[{model_cfg.get('base')}]"
    if model_cfg.arch == "cohort":
        return f"cohort[{model_cfg.size}x {describe(model_cfg.member)}]"
    if model_cfg.arch not in ("mlp", "cnn"):
        return model_cfg.arch
    join = lambda widths: ",".join(str(w) for w in widths or [])  # noqa: E731
    if model_cfg.arch == "cnn":
        dense = model_cfg.get("hidden")
        return f"cnn[{join(model_cfg.get('channels'))}]" + (f"+fc[{join(dense)}]" if dense else "")
    widths = model_cfg.get("hidden", model_cfg.get("channels"))
    return f"{model_cfg.arch}[{join(widths)}]"
