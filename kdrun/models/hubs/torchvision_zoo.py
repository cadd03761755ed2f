"""``arch: torchvision``: any classification model ``torchvision.models.get_model``
knows, as teacher or student; and ``arch: resnet18``, its ResNet-18 with the usual
CIFAR stem as an option (``small_inputs``), kept as a preset because that stem is
surgery on ResNets only.

The class count and input channels come from the data. ``pretrained=true`` (the
library's default weights) or ``pretrained=<tag>`` (e.g. IMAGENET1K_V1) reads the
weights from torch hub's local cache (``$TORCH_HOME/hub/checkpoints``) only, never
downloading them; ``weights=PATH`` loads a file of the user's. ``kwargs`` are the
builder's own keyword arguments (e.g. dropout).
"""

from __future__ import annotations

import difflib
import os

from torch import nn

from kdrun.checks import boolean
from kdrun.errors import ConfigError, UserError
from kdrun.models.base import MODELS, need_images
from kdrun.models.hubs.pretrained import (
    InputSpec,
    adapt_stem,
    check_weights_file,
    hub_checkpoint,
    kwargs_rule,
    load_file_into,
    missing_weights,
    weights_rule,
    zoo_identity,
)

RULES = {"name": lambda v: None if isinstance(v, str) and v else
         "must be a torchvision model name, e.g. resnet18 or mobilenet_v3_small",
         "pretrained": lambda v: None if isinstance(v, bool) or (isinstance(v, str) and v) else
         "must be true (the default weights), false, or a weights tag such as IMAGENET1K_V1",
         "weights": weights_rule, "kwargs": kwargs_rule}


def _names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _weights(name: str, pretrained, key: str):
    """The weights enum member ``pretrained`` names: DEFAULT for true, else its tag."""
    import torchvision

    choices = torchvision.models.get_model_weights(name)
    tag = "DEFAULT" if pretrained is True else str(pretrained)
    try:
        return choices[tag]
    except KeyError:
        valid = ", ".join(["true", *choices.__members__])
        raise ConfigError(key, pretrained, f"not a weights tag of {name}; valid: {valid}") from None


def cached_weights(name: str, pretrained, key: str) -> tuple[object, str]:
    """The weights enum member and its local file, or the one-line error."""
    weights = _weights(name, pretrained, key)
    path = hub_checkpoint(weights.url)
    if not os.path.isfile(path):
        fetch = (f"python -c \"import torchvision; torchvision.models.get_model('{name}', "
                 f"weights='{weights}')\"")
        raise missing_weights(f"torchvision's weights {weights}", os.path.dirname(path), fetch,
                              key)
    return weights, path


def build(name: str, channels: int, num_classes: int, pretrained=False,
          weights: str | None = None, kwargs: dict | None = None) -> nn.Module:
    """``get_model(name)`` with ``num_classes`` outputs and ``channels`` inputs, then the
    pretrained weights and the user's file, in that order."""
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes,
                                             **dict(kwargs or {}))
    except TypeError as e:  # a keyword the builder does not take
        raise UserError(f"kwargs of torchvision model {name}: {e}") from e
    adapt_stem(model, channels)
    if pretrained:
        tag, path = cached_weights(name, pretrained, "pretrained")
        load_file_into(model, path, f"torchvision {tag} ({path})")
    if weights is not None:
        load_file_into(model, weights, f"weights={weights}")
    return model


@MODELS.register("torchvision", rules=RULES)
def torchvision_model(input_shape, num_classes, name: str, pretrained: bool | str = False,
                      weights: str | None = None, kwargs: dict | None = None):
    """``torchvision.models.get_model(name)`` for this data (classes, input channels)."""
    need_images(input_shape, f"torchvision model ({name})")
    return build(name, input_shape[0], num_classes, pretrained, weights, kwargs)


@MODELS.register("resnet18", rules={"pretrained": boolean, "small_inputs": boolean})
def resnet18(input_shape, num_classes, pretrained: bool = False, small_inputs: bool = False):
    """torchvision's ResNet-18 (He et al. 2016). ``small_inputs`` swaps the 7x7/2 stem
    and max-pool for a 3x3/1 stem (the usual CIFAR variant)."""
    need_images(input_shape, "resnet18")
    model = build("resnet18", 3 if small_inputs else input_shape[0], num_classes, pretrained)
    if small_inputs:
        model.conv1 = nn.Conv2d(input_shape[0], 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


def check(model_cfg, prefix: str) -> None:
    """Before anything trains: a model torchvision knows, its pretrained weights on
    this machine, its weights file there."""
    name = str(model_cfg.get("name", "resnet18"))
    if name not in _names():
        close = difflib.get_close_matches(name, _names(), n=8, cutoff=0.5)
        hint = f"close matches: {', '.join(close)}" if close else \
            "see torchvision.models.list_models()"
        raise ConfigError(f"{prefix}.name", name, f"not a torchvision classification model; "
                                                  f"{hint}")
    if model_cfg.get("pretrained"):
        cached_weights(name, model_cfg.pretrained, f"{prefix}.pretrained")
    check_weights_file(model_cfg.get("weights"), f"{prefix}.weights")


def identity(model_cfg) -> dict:
    import torchvision

    pretrained = cached_weights(str(model_cfg.get("name", "resnet18")), model_cfg.pretrained,
                                "pretrained")[1] if model_cfg.get("pretrained") else None
    return zoo_identity(f"torchvision {torchvision.__version__}", pretrained,
                        model_cfg.get("weights"))


def input_spec(model_cfg) -> InputSpec | None:
    """The preprocessing of the weights (the default ones when none are chosen)."""
    name = str(model_cfg.get("name", "resnet18"))
    weights = _weights(name, model_cfg.get("pretrained") or True, "pretrained")
    transform = weights.transforms()
    size = transform.crop_size[0]
    return InputSpec((3, size, size), tuple(transform.mean), tuple(transform.std),
                     f"torchvision {weights}")


def describe(model_cfg) -> str:
    if model_cfg.arch == "resnet18":
        return "resnet18"
    return f"torchvision/{model_cfg.name}" + ("+pretrained" if model_cfg.get("pretrained")
                                              else "")


for _builder in (torchvision_model, resnet18):
    _builder.check, _builder.identity = check, identity
    _builder.input_spec, _builder.describe = input_spec, describe
