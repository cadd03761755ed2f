"""Weights that come from outside kdrun: a model zoo's pretrained weights (from the
library's local cache, never fetched behind the user's back) and a user's weights file
(``weights=PATH``: a PyTorch checkpoint or a safetensors file), put into a model built
for this data; and the input a pretrained model expects (its size, mean and std).

Used by the timm and torchvision builders (kdrun/models/hubs/timm_zoo.py,
kdrun/models/hubs/torchvision_zoo.py).
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kdrun.errors import ConfigError, UserError
from kdrun.store.files import cached_sha256, load_checkpoint

log = logging.getLogger("kdrun")

# where a checkpoint file keeps its state dict, tried in this order (kdrun's own, then
# the usual training-script containers), else the file is the state dict itself
STATE_KEYS = ("best_model", "model", "state_dict", "model_state_dict", "weights")


# checks of the keys the timm and torchvision builders share
def weights_rule(v) -> str | None:
    return None if v is None or (isinstance(v, str) and v) else (
        "must be the path of a weights file, or null")


def kwargs_rule(v) -> str | None:
    return None if v is None or isinstance(v, dict) else (
        "must be a mapping of the model's keyword arguments, e.g. {drop_rate: 0.1}")


@dataclass(frozen=True)
class InputSpec:
    """What a model's weights were trained on: (C, H, W), per-channel mean and std."""

    input_size: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str  # e.g. "timm resnet18.a1_in1k"

    def describe(self) -> str:
        size = "x".join(map(str, self.input_size))
        mean = ", ".join(f"{m:.3f}" for m in self.mean)
        std = ", ".join(f"{s:.3f}" for s in self.std)
        return f"{self.source} expects {size} inputs, mean ({mean}), std ({std})"


def not_a_file(path: Path) -> str | None:
    """Why ``path`` cannot be a weights file, or None when it is a file."""
    if path.is_file():
        return None
    return "a folder, not a weights file" if path.is_dir() else \
        "no such file (a .pt/.pth/.bin checkpoint or a .safetensors file)"


def check_weights_file(value, key: str) -> None:
    """``weights=PATH`` names a readable file (checked before anything trains)."""
    problem = None if value is None else not_a_file(Path(str(value)).expanduser())
    if problem:
        raise ConfigError(key, value, problem)


def file_identity(value) -> str | None:
    """The SHA-256 of a weights file (what a stage key holds: a file replaced under the
    same name is new weights); hashed once per process while the file is unchanged."""
    if value is None:
        return None
    return cached_sha256(Path(str(value)).expanduser())


def read_state_dict(value, source: str, entries=STATE_KEYS) -> dict[str, torch.Tensor]:
    """The state dict in a weights file, read without running code: safetensors, or a
    weights-only PyTorch file holding a plain state dict or a container of one (its
    first entry of ``entries``: a kdrun checkpoint, a training script's dict). ``source``
    (e.g. ``teacher.checkpoint=PATH``) starts every error line."""
    path = Path(str(value)).expanduser()
    problem = not_a_file(path)
    if problem:
        raise UserError(f"{source}: {problem}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # comes with timm

            return load_file(str(path))
        state = load_checkpoint(path)
    except ImportError as e:
        raise UserError(f"{source}: reading .safetensors needs the safetensors package: "
                        f"pip install safetensors") from e
    except pickle.UnpicklingError as e:  # torch's weights-only unpickler refused an object
        raise UserError(f"{source}: not a loadable weights-only PyTorch checkpoint (it holds "
                        f"Python objects besides tensors, and loading those could run code; "
                        f"save a state_dict instead)") from e
    except Exception as e:  # truncated, or not a torch file at all
        raise UserError(f"{source}: not a loadable weights-only PyTorch checkpoint "
                        f"({str(e).splitlines()[0][:120]})") from e
    for name in entries:
        if isinstance(state, dict) and isinstance(state.get(name), dict):
            state = state[name]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{source}: expected a state dict (layer name -> tensor) or a "
                        f"checkpoint holding one")
    return {k.removeprefix("module."): v for k, v in state.items()}  # DataParallel's prefix


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict that must fit ``model`` exactly, naming the first layer that
    does not."""
    own = model.state_dict()
    for name, tensor in state.items():
        if name not in own:
            raise UserError(f"{source}: the file has a layer {name} that this model lacks "
                            f"(its first layers: {', '.join(list(own)[:5])}, ...): weights of "
                            f"another architecture?")
        if own[name].shape != tensor.shape:
            raise UserError(f"{source}: layer {name} has shape {list(tensor.shape)} in the "
                            f"checkpoint but {list(own[name].shape)} in this model (made for "
                            f"another architecture or class count?)")
    missing = [name for name in own if name not in state]
    if missing:
        raise UserError(f"{source}: the file lacks layer {missing[0]} of this model "
                        f"({len(missing)} missing)")
    model.load_state_dict(state)


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_weights`` for a model built for this data from weights made for other data:
    the class head keeps its fresh init where the file's has another class count, and
    the first convolution takes the file's where only its input channels differ (summed
    over the file's channels and spread over the data's: a gray image repeated on every
    channel gets the response the weights give a gray RGB image)."""
    own = model.state_dict()
    head, stem = _head_and_stem(model)
    adapted = dict(state)
    for name, tensor in state.items():
        if name not in own or own[name].shape == tensor.shape:
            continue
        if name.rpartition(".")[0] == head:
            adapted[name] = own[name]
            log.info("%s: the head %s keeps a fresh init (the file's has shape %s, this data "
                     "needs %s)", source, name, list(tensor.shape), list(own[name].shape))
        elif name == f"{stem}.weight" and tensor.shape[0] == own[name].shape[0] \
                and tensor.shape[2:] == own[name].shape[2:]:
            channels = own[name].shape[1]
            adapted[name] = tensor.sum(1, keepdim=True).repeat(1, channels, 1, 1) / channels
            log.info("%s: first convolution adapted from %d to %d input channels", source,
                     tensor.shape[1], channels)
    load_weights(model, adapted, source)


def load_file_into(model: nn.Module, path, source: str) -> None:
    """``load_into`` with the state dict of a weights file (``weights=PATH``, a cached
    pretrained file); ``source`` names it in errors."""
    load_into(model, read_state_dict(path, source), source)


def zoo_identity(library: str, pretrained_file: str | None, weights) -> dict:
    """What a stage key holds about a zoo model besides its config: the library and its
    version (they define the architecture), and the content of the weights it starts
    from (the library's pretrained file, the user's file)."""
    found = {"library": library}
    if pretrained_file is not None:
        found["pretrained_sha256"] = file_identity(pretrained_file)
    if weights is not None:
        found["weights_sha256"] = file_identity(weights)
    return found


def _head_and_stem(model: nn.Module) -> tuple[str, str]:
    """The module names of the class head (the last linear layer) and of the first
    convolution."""
    names = dict(model.named_modules())
    head = next((n for n, m in reversed(names.items()) if isinstance(m, nn.Linear)), "")
    stem = next((n for n, m in names.items() if isinstance(m, nn.Conv2d | nn.Conv1d)), "")
    return head, stem


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def adapt_stem(model: nn.Module, channels: int) -> None:
    """Give the first convolution ``channels`` inputs (a fresh init), when it has others."""
    _, stem = _head_and_stem(model)
    conv = model.get_submodule(stem)
    if conv.in_channels == channels:
        return
    replace_module(model, stem, type(conv)(
        channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode))


def missing_weights(what: str, cache_path: str, fetch: str, key: str) -> UserError:
    """The one line a user sees when pretrained weights are not on this machine."""
    return UserError(f"{key}: {what} are not in the local cache ({cache_path}), and kdrun "
                     f"never downloads behind your back: on a machine with network run "
                     f"`{fetch}` and copy the file there (or set TORCH_HOME / HF_HOME to where "
                     f"it is), or give the file as {key.rpartition('.')[0]}.weights=PATH")


def hub_checkpoint(url: str) -> str:
    """Where ``torch.hub`` keeps the file of ``url`` (``$TORCH_HOME/hub/checkpoints``)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
