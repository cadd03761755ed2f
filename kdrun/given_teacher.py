"""A user's own trained teacher (``teacher.checkpoint=FILE``): read without running
code, fitted to the architecture the teacher config describes, every failure named in
one line."""

from __future__ import annotations

import pickle
from pathlib import Path

from torch import nn

from kdrun.errors import UserError
from kdrun.models import build_model, load_weights
from kdrun.store import load_checkpoint


def load_given_teacher(model_cfg, input_shape, num_classes: int, weights: str) -> nn.Module:
    """The model ``model_cfg`` describes with the weights of its ``checkpoint`` file: a
    kdrun checkpoint (its ``weights`` entry, else ``model``) or a plain state dict."""
    source = f"teacher.checkpoint={model_cfg.checkpoint}"
    path = Path(model_cfg.checkpoint).expanduser()
    if not path.is_file():
        raise UserError(f"{source}: " + ("a folder, not a checkpoint file" if path.is_dir()
                                         else "no such file"))
    try:
        checkpoint = load_checkpoint(path)
    except pickle.UnpicklingError as e:  # torch's weights-only unpickler refused an object
        raise UserError(f"{source}: not a loadable weights-only PyTorch checkpoint (it holds "
                        f"Python objects besides tensors, and loading those could run "
                        f"code; save a state_dict instead)") from e
    except Exception as e:  # truncated, or not a torch file at all
        raise UserError(f"{source}: not a loadable weights-only PyTorch checkpoint "
                        f"({str(e).splitlines()[0][:120]})") from e
    if not isinstance(checkpoint, dict):
        raise UserError(f"{source}: expected a state dict or a kdrun checkpoint")
    state = checkpoint.get(weights) or checkpoint.get("model") or checkpoint
    model = build_model(model_cfg, input_shape, num_classes, "teacher")
    load_weights(model, state, source)
    return model
