"""``arch: timm``: any model ``timm.create_model`` knows, as teacher or student.

Its class count and input channels come from the data. ``pretrained=true`` takes the
weights timm would download from the local Hugging Face (or torch hub) cache only:
when they are not there the user gets one line saying where they belong, before
anything trains, never a download attempt that retries for a minute offline.
``weights=PATH`` loads a file of the user's. ``kwargs`` are the model's own keyword
arguments (drop_rate, drop_path_rate, ...). timm is an optional extra:
``pip install 'kdrun[timm]'``.
"""

from __future__ import annotations

import difflib
import os

from kdrun.checks import boolean
from kdrun.errors import ConfigError, UserError
from kdrun.models.base import MODELS, need_images
from kdrun.models.hubs.pretrained import (
    InputSpec,
    check_weights_file,
    hub_checkpoint,
    kwargs_rule,
    load_file_into,
    missing_weights,
    weights_rule,
    zoo_identity,
)

RULES = {
    "name": lambda v: None if isinstance(v, str) and v else "must be a timm model name, e.g. "
                                                            "resnet18 or convnext_tiny.fb_in1k",
    "pretrained": boolean,
    "weights": weights_rule,
    "kwargs": kwargs_rule,
}
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub repos hold


def _timm():
    try:
        import timm
    except ImportError as e:
        raise UserError("arch=timm needs timm: pip install 'kdrun[timm]'") from e
    return timm


@MODELS.register("timm", rules=RULES)
def timm_model(input_shape, num_classes, name: str, pretrained: bool = False,
               weights: str | None = None, kwargs: dict | None = None):
    """``timm.create_model(name)`` for this data (classes, input channels)."""
    need_images(input_shape, f"timm model ({name})")
    timm = _timm()
    options = dict(num_classes=num_classes, in_chans=input_shape[0], **dict(kwargs or {}))
    if pretrained:  # timm loads the cached file itself (head and stem adapted its own way)
        options.update(pretrained=True, pretrained_cfg_overlay={
            "file": cached_weights(name, "pretrained"), "source": ""})
    try:
        model = timm.create_model(name, **options)
    except TypeError as e:  # a keyword the model does not take
        raise UserError(f"kwargs of timm model {name}: {e}") from e
    if weights is not None:
        load_file_into(model, weights, f"weights={weights}")
    return model


def _pretrained_cfg(name: str):
    """timm's record of ``name``'s weights (its default tag's without one), or None."""
    from timm.models import get_pretrained_cfg

    try:
        return get_pretrained_cfg(name)
    except RuntimeError:  # a tag timm does not have
        return None


def cached_weights(name: str, key: str) -> str:
    """The local file of ``name``'s pretrained weights, or the one-line error."""
    cfg = _pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ConfigError(key, True, f"timm has no pretrained weights for {name}")
    if cfg.file and os.path.isfile(cfg.file):
        return cfg.file
    if cfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        for filename in HUB_FILES:
            path = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(path, str):
                return path
        where = os.path.join(constants.HF_HUB_CACHE,
                             "models--" + cfg.hf_hub_id.replace("/", "--"))
    else:
        where = hub_checkpoint(cfg.url)
        if os.path.isfile(where):
            return where
    fetch = f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\""
    raise missing_weights(f"timm's weights {cfg.hf_hub_id or cfg.url}", where, fetch, key)


def check(model_cfg, prefix: str) -> None:
    """Before anything trains: a model timm knows, its pretrained weights on this
    machine, its weights file there."""
    timm, name = _timm(), str(model_cfg.get("name"))
    if timm.is_model(name) and "." in name and _pretrained_cfg(name) is None:
        tags = timm.list_pretrained(f"{name.split('.')[0]}.*")[:8]
        raise ConfigError(f"{prefix}.name", name, f"timm has no weights of that tag; its "
                          f"tagged names: {', '.join(tags) or 'none'}")
    if not timm.is_model(name):
        base = name.split(".")[0]
        close = (timm.list_models(f"*{base}*") or
                 difflib.get_close_matches(base, timm.list_models(), n=8, cutoff=0.6))[:8]
        hint = f"close matches: {', '.join(close)}" if close else "see timm.list_models()"
        raise ConfigError(f"{prefix}.name", name, f"not a timm model; {hint}")
    if model_cfg.get("pretrained"):
        cached_weights(name, f"{prefix}.pretrained")
    check_weights_file(model_cfg.get("weights"), f"{prefix}.weights")


def identity(model_cfg) -> dict:
    pretrained = cached_weights(str(model_cfg.name), "pretrained") \
        if model_cfg.get("pretrained") else None
    return zoo_identity(f"timm {_timm().__version__}", pretrained, model_cfg.get("weights"))


def input_spec(model_cfg) -> InputSpec | None:
    cfg = _pretrained_cfg(str(model_cfg.name))
    if cfg is None:
        return None
    tag = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
    return InputSpec(tuple(cfg.input_size), tuple(cfg.mean), tuple(cfg.std), f"timm {tag}")


def describe(model_cfg) -> str:
    return f"timm/{model_cfg.name}" + ("+pretrained" if model_cfg.get("pretrained") else "")


timm_model.check, timm_model.identity = check, identity
timm_model.input_spec, timm_model.describe = input_spec, describe
