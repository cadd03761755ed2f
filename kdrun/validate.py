"""One validation step over the composed config, before anything is trained.

Each rule checks one key and says what would be valid; the first failure raises a
ConfigError that the CLI prints as one line. Keys a config does not have (e.g.
``loss.T`` under ``loss=ce``) are skipped.
"""

from __future__ import annotations

import inspect

from omegaconf import DictConfig, ListConfig, OmegaConf

from kdrun import data, losses, models, schemes
from kdrun.checks import (
    Check,
    boolean,
    device,
    int_or_ints,
    number,
    one_of,
    positive_ints,
)
from kdrun.errors import ConfigError

RULES: dict[str, Check] = {
    "seed": number(integer=True),
    "repeats": number(1, integer=True),
    "device": device,
    "num_threads": number(1, integer=True, optional=True),
    "progress": boolean,
    "export": one_of("none", "onnx"),
    "latency.repeats_b1": number(4, integer=True),
    "latency.repeats_b256": number(4, integer=True),
    "latency.warmup": number(0, integer=True),
    "scheme.name": one_of(*schemes.SCHEMES),
    "scheme.generations": number(1, integer=True),
    "scheme.students": number(2, integer=True),
    "scheme.T": number(0, lo_open=True),
    "cache.enabled": boolean,
    "cache.dir": lambda v: None if isinstance(v, str) and v else "must be a directory path",
    "split.val_fraction": number(0, 1, hi_open=True),
    "split.seed": number(integer=True),
    "split.max_train": number(1, integer=True, optional=True),
    "split.max_test": number(1, integer=True, optional=True),
    "split.standardize": boolean,
    "dataset.name": one_of(*data.DATASETS),
    "dataset.num_samples": number(10, integer=True),
    "dataset.n": number(10, integer=True),
    "dataset.dim": number(1, integer=True),
    "dataset.classes": number(2, integer=True),
    "dataset.test_fraction": number(0, 1, lo_open=True, hi_open=True),
    "dataset.random_labels": boolean,
    "dataset.download": boolean,
    "dataset.channels": one_of(1, 3),
    "dataset.augment.crop_padding": number(0, integer=True),
    "dataset.augment.hflip": boolean,
    "dataset.label_from": one_of("folder", "filename_prefix"),
    "dataset.image_size": number(1, integer=True),
    "dataset.crop_padding": number(0, integer=True),
    "dataset.hflip": boolean,
    "dataset.rotation": number(0),
    "dataset.workers": number(0, integer=True),
    "teacher.checkpoint": lambda v: None if v is None or (isinstance(v, str) and v) else (
        "must be the path of a teacher checkpoint, or null to train one"),
    "logger.name": one_of("csv", "tensorboard"),
    "trainer.epochs": number(1, integer=True),
    "trainer.teacher_epochs": number(1, integer=True, optional=True),
    "trainer.student_epochs": number(1, integer=True, optional=True),
    "trainer.batch_size": number(1, integer=True),
    "trainer.eval_batch_size": number(1, integer=True),
    "trainer.optimizer": one_of("adam", "adamw", "sgd"),
    "trainer.lr": number(0, lo_open=True),
    "trainer.momentum": number(0, 1, hi_open=True),
    "trainer.weight_decay": number(0),
    "trainer.schedule": one_of("none", "cosine", "step"),
    "trainer.step_size": number(1, integer=True),
    "trainer.gamma": number(0, 1, lo_open=True),
    "trainer.grad_clip": number(0, lo_open=True, optional=True),
    "trainer.distill_from": one_of("best_val", "last"),
    "trainer.checkpoint_every": number(0, integer=True),
    "trainer.on_nan": one_of("stop", "skip"),
    **{f"trainer.{key}": boolean for key in ("cache_teacher_logits", "amp", "tf32",
                                              "cudnn_benchmark", "fused_optimizer",
                                              "channels_last", "compile")},
}
MODEL_RULES: dict[str, Check] = {
    "hidden": lambda v: None if v == [] else positive_ints(v),
    "channels": positive_ints,
    "kernel_size": int_or_ints,
    "stride": int_or_ints,
    "dropout": number(0, 1, hi_open=True),
    "pool": one_of("none", "max", "avg"),
    "global_pool": number(1, integer=True, optional=True),
    "batch_norm": boolean,
    "base": number(1, integer=True),
    "multipliers": positive_ints,
    "pool_blocks": number(0, integer=True),
    "pretrained": boolean,
    "small_inputs": boolean,
}
_ABSENT = object()


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first invalid key of a composed kdrun config."""
    for key, check in RULES.items():
        _check(key, OmegaConf.select(cfg, key, default=_ABSENT), check)
    _check_params("dataset", cfg.dataset, data.builder_keys(cfg.dataset.name),
                  data.NOT_BUILDER_KEYS)
    _check_loss(cfg.loss)
    for role in ("teacher", "student"):
        _check_model(role, cfg[role])
    if cfg.scheme.name == "ensemble":
        _check_ensemble(cfg)


def _check_model(role: str, node) -> None:
    models.MODELS.get(str(node.get("arch")), f"{role}.arch")  # registered, or importable
    for key, check in MODEL_RULES.items():
        _check(f"{role}.{key}", node.get(key, _ABSENT), check)
    _check_params(role, node, models.builder_keys(node.arch), models.NOT_BUILDER_KEYS)


def group_options(group: str, search_path: tuple[str, ...] = ()) -> list[str]:
    """The options of a config group: the YAML files in kdrun's configs/<group>/ and in
    <folder>/<group>/ of each ``hydra.searchpath`` folder (a user's own configs)."""
    from importlib.resources import files
    from pathlib import Path

    folders = [files("kdrun.configs") / group, *(Path(f) / group for f in search_path)]
    return sorted({p.name.removesuffix(".yaml") for folder in folders if folder.is_dir()
                   for p in folder.iterdir() if p.name.endswith(".yaml")})


def _check_ensemble(cfg: DictConfig) -> None:
    """Members must be known teacher options; the loss and data must allow combining
    cached logits."""
    _check("scheme.combine", cfg.scheme.combine, one_of("arithmetic", "geometric"))
    options = group_options("teacher")
    for i, spec in enumerate(cfg.scheme.teachers):
        key = f"scheme.teachers[{i}].option"
        _check(key, spec.get("option"), one_of(*options))
        _check_model(f"scheme.teachers[{i}]", schemes.teacher_config(spec))
    if losses.loss_class(cfg.loss).reads_features:
        raise ConfigError("loss", cfg.loss.name, "scheme=ensemble combines the teachers' "
                          "logits: use a logit-based loss (kd, dkd, dist, mse_logits, ce)")
    augment = cfg.dataset.get("augment")
    if cfg.dataset.name == "imagefolder" or (augment and (augment.crop_padding or augment.hflip)):
        raise ConfigError("dataset", cfg.dataset.name, "scheme=ensemble needs in-memory data "
                          "without augmentation (its teachers' logits are computed once)")


def _check_loss(node) -> None:
    """The loss's class exists (a registered name or an import path), every key of its
    config is an argument of its constructor, none it needs is missing, and each passes
    the check the class declares for it (``config_rules``)."""
    cls = losses.loss_class(node)
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    params = {name: p for name, p in inspect.signature(cls).parameters.items()
              if p.kind not in variadic}
    accepted = list(params)
    for key in node:
        if key != "name" and key not in accepted:
            raise ConfigError(f"loss.{key}", node[key], f"not a setting of loss {node.name}; "
                              f"valid: {', '.join(accepted) or 'none'}")
    for key in accepted:
        if key not in node and params[key].default is inspect.Parameter.empty:
            raise ConfigError(f"loss.{key}", None, f"loss {node.name} needs this key")
    for key, check in cls.config_rules.items():
        _check(f"loss.{key}", node.get(key, _ABSENT), check)


def _check(key: str, value, check: Check) -> None:
    if value is _ABSENT:
        return
    if isinstance(value, ListConfig | DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    problem = check(value)
    if problem:
        raise ConfigError(key, value, problem)


def _check_params(group: str, node, accepted: list[str], own: tuple[str, ...]) -> None:
    """Every key of a dataset or model config must be an argument of its builder."""
    for key in node:
        if key not in accepted and key not in own:
            raise ConfigError(f"{group}.{key}", node[key],
                              f"not a setting of {group} {node.get('name') or node.get('arch')}; "
                              f"valid: {', '.join(accepted)}")
