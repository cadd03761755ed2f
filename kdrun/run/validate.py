"""One validation step over the composed config, before anything is trained.

The settings every run has (seed, split, trainer, ...) are checked by RULES below;
an option of a config group (a data set, a model, a loss, a scheme) declares the
checks of its own keys where it is defined, and its keys must be its arguments. Each
check says what would be valid; the first failure raises a ConfigError that the CLI
prints as one line.
"""

from __future__ import annotations

import inspect

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from kdrun import data, losses, models
from kdrun.checks import (
    Check,
    boolean,
    device,
    increasing_epochs,
    label_budget,
    number,
    one_of,
)
from kdrun.data.augment import AUGMENT_RULES
from kdrun.distributed import World
from kdrun.errors import ConfigError
from kdrun.precision import on_gpu
from kdrun.run import int8_students, schemes
from kdrun.run.search import search_objectives

RULES: dict[str, Check] = {
    "seed": number(integer=True),
    "repeats": number(1, integer=True),
    "device": device,
    "num_threads": lambda v: None if v == "auto" or not number(1, integer=True, optional=True)(v)
    else "must be auto, null or an integer >= 1",
    "one_thread_below_mflop": number(0),
    "progress": boolean,
    "export": one_of("none", "onnx"),
    "student.quantize": lambda v: None if v in (None, "int8") else "must be null or int8",
    "distributed.backend": one_of("auto", "gloo", "nccl"),
    "distributed.timeout_min": number(0, lo_open=True),
    "latency.repeats_b1": number(4, integer=True),
    "latency.repeats_b256": number(4, integer=True),
    "latency.warmup": number(0, integer=True),
    "search.objectives": search_objectives,
    "search.tolerance": number(0),
    "cache.enabled": boolean,
    "cache.dir": lambda v: None if isinstance(v, str) and v else "must be a directory path",
    "split.val_fraction": number(0, 1, hi_open=True),
    "split.seed": number(integer=True),
    "split.max_train": number(1, integer=True, optional=True),
    "split.max_test": number(1, integer=True, optional=True),
    "split.labeled": label_budget,
    "all_labels_reference": boolean,
    "split.standardize": boolean,
    "dataset.normalize": one_of("data", "model"),
    **{f"dataset.augment.{key}": check for key, check in AUGMENT_RULES.items()},
    "teacher.checkpoint": lambda v: None if v is None or (isinstance(v, str) and v) else (
        "must be the path of a teacher checkpoint, or null to train one"),
    "logger.name": one_of("csv", "tensorboard", "mlflow"),
    "logger.tracking_uri": lambda v: None if v is None or (isinstance(v, str) and v) else (
        "must be an MLflow tracking URI (http://host:5000, sqlite:///mlflow.db, file:DIR), "
        "or null for <output_root>/mlruns"),
    "logger.experiment": lambda v: None if isinstance(v, str) and v else (
        "must be an MLflow experiment name"),
    "trainer.epochs": number(1, integer=True),
    "trainer.teacher_epochs": number(1, integer=True, optional=True),
    "trainer.student_epochs": number(1, integer=True, optional=True),
    "trainer.batch_size": number(1, integer=True),
    "trainer.eval_batch_size": number(1, integer=True),
    "trainer.optimizer": one_of("adam", "adamw", "sgd"),
    "trainer.lr": number(0, lo_open=True),
    "trainer.momentum": number(0, 1, hi_open=True),
    "trainer.weight_decay": number(0),
    "trainer.schedule": one_of("none", "cosine", "linear", "step", "multistep"),
    "trainer.schedule_unit": one_of("epoch", "step"),
    "trainer.warmup_steps": lambda v: None if isinstance(v, (int, float)) and not
    isinstance(v, bool) and (0 <= v < 1 or float(v).is_integer() and v >= 1) else (
        "must be 0, a share of the stage's steps (0 < x < 1) or a number of steps"),
    "trainer.min_lr": number(0),
    "trainer.accumulate": number(1, integer=True),
    "trainer.betas": lambda v: None if isinstance(v, list) and len(v) == 2 and all(
        isinstance(b, (int, float)) and 0 <= b < 1 for b in v) else (
        "must be two numbers in [0, 1), e.g. [0.9, 0.999]"),
    "trainer.milestones": increasing_epochs,
    "trainer.warmup_epochs": number(0, integer=True),
    "trainer.step_size": number(1, integer=True),
    "trainer.gamma": number(0, 1, lo_open=True),
    "trainer.grad_clip": number(0, lo_open=True, optional=True),
    "trainer.distill_from": one_of("best_val", "last"),
    "trainer.checkpoint_every": number(0, integer=True),
    "trainer.on_nan": one_of("stop", "skip"),
    "trainer.cache_teacher_features_mb": number(0),
    "trainer.teacher_topk": number(1, integer=True, optional=True),
    "trainer.teacher_cache": one_of("auto", "full"),
    "trainer.auto_topk": number(1, integer=True, optional=True),
    "trainer.memory_share": number(0, 1, lo_open=True, optional=True),
    "trainer.loss_chunk_rows": number(1, integer=True, optional=True),
    **{f"trainer.{key}": boolean for key in ("cache_teacher_logits", "amp", "tf32",
                                              "cudnn_benchmark", "fused_optimizer",
                                              "channels_last", "compile", "float64")},
}
_ABSENT = object()


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first invalid key of a composed kdrun config."""
    for key, check in RULES.items():
        _check(key, OmegaConf.select(cfg, key, default=_ABSENT), check)
    _check_option("dataset", cfg.dataset, data.DATASETS, "name", skip=data.NOT_BUILDER_KEYS)
    _check_option("loss", cfg.loss, losses.LOSSES, "name")
    params = losses.LOSSES.arguments(str(cfg.loss.name), "loss.name")  # their defaults,
    defaults = {k: p.default for k, p in params.items()  # then the config's values
                if p.default is not inspect.Parameter.empty}
    loss_class = losses.loss_class(cfg.loss)
    loss_class.check_config({**defaults, **OmegaConf.to_container(cfg.loss, resolve=True)})
    if cfg.trainer.get("loss_chunk_rows") and not loss_class.chunks_rows:
        chunked = ", ".join(name for name in losses.LOSSES.names()
                            if losses.LOSSES.get(name, "loss.name").chunks_rows)
        raise ConfigError("trainer.loss_chunk_rows", cfg.trainer.loss_chunk_rows,
                          f"loss={cfg.loss.name} is not computed row by row; chunks apply to "
                          f"{chunked} (or set it to null)")
    _check_steps(cfg)
    _check_other_tokenizer(cfg, loss_class)
    for role in ("teacher", "student"):
        _check_model(role, cfg[role])
    _check_option("scheme", cfg.scheme, schemes.SCHEMES, "name")
    scheme = schemes.scheme_of(cfg)
    scheme.check(cfg)
    if int8_students.wanted(cfg):
        int8_students.check_settings(cfg, loss_class, scheme, [
            name for name in schemes.SCHEMES.names()
            if schemes.SCHEMES.get(name, "scheme.name").int8_students])
    for prefix, node in scheme.models(cfg):  # e.g. an ensemble's members
        _check_model(prefix, node)


def _check_steps(cfg: DictConfig) -> None:
    """Per-step schedules decay (cosine, linear) or stay (none) to a floor below lr."""
    tcfg = cfg.trainer
    if tcfg.get("schedule_unit") == "step" and tcfg.schedule not in ("none", "cosine", "linear"):
        raise ConfigError("trainer.schedule", tcfg.schedule, "with trainer.schedule_unit=step: "
                          "cosine, linear or none (step and multistep count epochs)")
    if (tcfg.get("min_lr") or 0) >= tcfg.lr and tcfg.schedule in ("cosine", "linear"):
        raise ConfigError("trainer.min_lr", tcfg.min_lr, f"must be below trainer.lr={tcfg.lr}")


def _check_other_tokenizer(cfg: DictConfig, loss_class) -> None:
    """A teacher with its own tokenizer: a learned BPE for the student, a loss that compares
    distributions without token identities, the teacher's every logit, cached, from a
    teacher kdrun trains, and a scheme that aligns it."""
    given = cfg.dataset.get("teacher_tokenizer")
    if given is None or given == cfg.dataset.get("tokenizer"):
        return
    key = "dataset.teacher_tokenizer"
    if not str(cfg.dataset.get("tokenizer")).startswith("bpe:"):
        raise ConfigError(key, given, "a byte-level teacher aligns with a student tokenized by "
                          "dataset.tokenizer=bpe:N (each token exact bytes)")
    if not loss_class.cross_vocab:
        crossing = ", ".join(n for n in losses.LOSSES.names()
                             if losses.LOSSES.get(n, "loss.name").cross_vocab)
        raise ConfigError("loss.name", cfg.loss.name, f"compares the teacher's and the "
                          f"student's distributions token by token, one vocabulary; with "
                          f"{key}: {crossing}")
    if not schemes.scheme_of(cfg).other_tokenizer:
        raise ConfigError("scheme.name", cfg.scheme.name, f"does not align a teacher's "
                          f"tokenizer yet; with {key}: scheme=offline")
    if cfg.trainer.get("teacher_topk") or not cfg.trainer.cache_teacher_logits:
        raise ConfigError(key, given, "needs the teacher's every logit, cached "
                          "(trainer.teacher_topk=null, trainer.cache_teacher_logits=true)")
    if cfg.teacher.get("name") or cfg.teacher.get("checkpoint"):
        raise ConfigError(key, given, "aligns a teacher kdrun trains on the text as bytes; "
                          "set teacher.name and teacher.checkpoint to null")


def _check_model(prefix: str, node) -> None:
    _check_option(prefix, node, models.MODELS, "arch", given=("input_shape", "num_classes"),
                  skip=models.NOT_BUILDER_KEYS)
    own_check = models.builder_hook(node, "check")  # e.g. a timm name, its cached weights
    if own_check is not None:
        own_check(node, prefix)


def _check_option(prefix: str, node, registry, name_key: str, given=(), skip=()) -> None:
    """An option of a config group (a loss, a model, a data set): its ``name_key`` names
    a registered one or an import path; every other key is an argument of its class or
    builder; none it needs is missing; each passes the check the option declares."""
    name = node.get(name_key)
    registry.get(str(name), f"{prefix}.{name_key}")
    params = registry.arguments(str(name), f"{prefix}.{name_key}", given)
    for key in node:
        if key not in params and key not in (name_key, *skip):
            raise ConfigError(f"{prefix}.{key}", node[key], f"not a setting of {prefix} "
                              f"{name}; valid: {', '.join(params) or 'none'}")
    for key, p in params.items():
        if key not in node and p.default is inspect.Parameter.empty:
            raise ConfigError(f"{prefix}.{key}", None, f"{prefix} {name} needs this key")
    for key, check in registry.rules(str(name)).items():
        _check(f"{prefix}.{key}", node.get(key, _ABSENT), check)


def group_options(group: str, search_path: tuple[str, ...] = ()) -> list[str]:
    """The options of a config group: the YAML files in kdrun's configs/<group>/ and in
    <folder>/<group>/ of each ``hydra.searchpath`` folder (a user's own configs)."""
    from importlib.resources import files
    from pathlib import Path

    folders = [files("kdrun.configs") / group, *(Path(f) / group for f in search_path)]
    return sorted({p.name.removesuffix(".yaml") for folder in folders if folder.is_dir()
                   for p in folder.iterdir() if p.name.endswith(".yaml")})


def _check(key: str, value, check: Check) -> None:
    if value is _ABSENT:
        return
    if isinstance(value, ListConfig | DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    problem = check(value)
    if problem:
        raise ConfigError(key, value, problem)


def check_processes(cfg: DictConfig, world: World) -> str:
    """Before the processes meet: the settings that several of them (torchrun, Slurm
    tasks) cannot run, each a ConfigError; returns the backend they will talk through."""
    size, batch = world.size, cfg.trainer.batch_size
    if batch < size:
        raise ConfigError("trainer.batch_size", batch, f"is smaller than the {size} "
                          f"processes: each needs rows of every batch; use at least {size}, "
                          "or fewer processes")
    if batch % size:
        raise ConfigError("trainer.batch_size", batch, f"must be divisible by the {size} "
                          f"processes, so that each takes an equal shard; use a multiple of {size}")
    if str(cfg.device).startswith("cuda:"):
        raise ConfigError("device", cfg.device, "names one GPU, but each process takes the GPU "
                          "of its local rank; use device=cuda or auto")
    if int8_students.wanted(cfg):
        raise ConfigError("student.quantize", "int8", "int8 students train in one process; "
                          "start kdrun without torchrun")
    scheme = schemes.scheme_of(cfg)
    if not scheme.data_parallel:
        raise ConfigError("scheme.name", scheme.name, "trains in one process; start kdrun "
                          "without torchrun")
    loss = losses.loss_class(cfg.loss)
    if loss.reads_indices:
        raise ConfigError("loss.name", cfg.loss.name, "keeps a memory of every training example, "
                          "which processes do not share; run it in one process")
    wanted, gpus = cfg.distributed.backend, on_gpu(cfg.device) and torch.cuda.is_available()
    backend = ("nccl" if gpus else "gloo") if wanted == "auto" else wanted
    if not torch.distributed.is_available():
        raise ConfigError("distributed.backend", wanted, "this torch build has no "
                          "torch.distributed; run in one process")
    available = {"gloo": torch.distributed.is_gloo_available(),
                 "nccl": gpus and torch.distributed.is_nccl_available()}
    if not available[backend]:
        valid = " or ".join(name for name, ok in available.items() if ok) or "one process"
        why = "NCCL needs CUDA GPUs" if backend == "nccl" else "not in this torch build"
        raise ConfigError("distributed.backend", wanted, f"{backend} is not available here "
                          f"({why}); use {valid}")
    return backend
