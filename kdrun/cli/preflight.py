"""Before Hydra starts, every job's config (one, or each point of a ``-m`` sweep) is
composed and validated, so a typo fails in a second with one line on stderr and exit
code 2, before anything is trained or written."""

from __future__ import annotations

import os
import re
import shutil
from importlib.resources import files
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kdrun.errors import ConfigError, UserError
from kdrun.run.validate import group_options, validate
from kdrun.store.faults import free_bytes, nearest_existing
from kdrun.sweep.compose import split_plain, with_values

CONFIG_MODULE = "kdrun.configs"
SWEEP_FLAGS = ("-m", "--multirun")
SWEEPER_CHOICES = ("hparams_search=", "hydra/sweeper=")  # these run a multirun without -m
# An option that needs an optional package: (module to find, pip extra that brings it).
OPTIONAL = {
    ("hydra/launcher", "joblib"): ("hydra_plugins.hydra_joblib_launcher", "parallel"),
    ("hydra/launcher", "submitit_slurm"): ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    ("hydra/launcher", "submitit_local"): ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    ("hydra/sweeper", "optuna"): ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
    ("hparams_search", "kd_optuna"): ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
    ("logger", "tensorboard"): ("tensorboard", "tensorboard"),
    ("logger", "mlflow"): ("mlflow", "mlflow"),
    ("teacher", "timm"): ("timm", "timm"),
    ("student", "timm"): ("timm", "timm"),
}


def preflight(argv: list[str]) -> DictConfig | None:
    """Compose and validate the config of every job the command line asks for; returns
    the first (None for Hydra's own flags)."""
    if any(a.startswith("-") and a not in SWEEP_FLAGS for a in argv):
        return None  # --help, --cfg, -cp, ...: Hydra's own flags, Hydra handles them
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    overrides = [a for a in argv if a not in SWEEP_FLAGS]
    sweep = any(a in SWEEP_FLAGS or a.startswith(SWEEPER_CHOICES) for a in argv)
    jobs = _expand(overrides) if sweep else [overrides]
    composed: dict[tuple[str, ...], DictConfig] = {}
    first = None
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        for job in jobs:
            _check_group_choices(job)
            _check_optional_packages(job)
            _check_slurm_commands(job)
            cfg = _reuse_composition(job, compose, composed)
            if cfg is None:
                try:
                    cfg = compose("config", overrides=job)
                except HydraException as e:
                    raise UserError(_unknown_key_message(str(e), job, compose) or
                                    _hydra_message_on_one_line(str(e))) from e
            validate(cfg)
            _check_search_space(job, compose)
            _check_writable("output_root", cfg.output_root)
            if cfg.cache.enabled:
                _check_writable("cache.dir", cfg.cache.dir)
            if cfg.logger.name == "mlflow" and cfg.logger.get("tracking_uri"):
                from kdrun.report.mlflow_log import check_reachable

                check_reachable(cfg.logger.tracking_uri)  # before anything trains
            first = first or cfg
    return first


def _reuse_composition(job: list[str], compose, composed: dict) -> DictConfig | None:
    """The job's config built as Hydra builds it, composing only once per distinct set
    of the job's other overrides (``split_plain``). A sweep over values then composes a
    few times instead of once per job. None when anything goes differently: the caller
    composes the whole job and Hydra names the problem."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        plain, rest = split_plain(OverridesParser.create().parse_overrides(job))
        if rest not in composed:
            composed[rest] = compose("config", overrides=list(rest))
        return with_values(composed[rest], plain)
    except Exception:  # a problem Hydra's own composition reports better
        return None


def _check_search_space(job: list[str], compose) -> None:
    """A sweeper's search space (``hydra.sweeper.params``) may only name keys the job's
    config has: ``hparams_search=kd_optuna loss=dkd`` would search ``loss.alpha``,
    which DKD lacks."""
    if not any(a.startswith(SWEEPER_CHOICES) for a in job):
        return
    cfg = compose("config", overrides=job, return_hydra_config=True)
    for key in cfg.hydra.sweeper.get("params") or {}:
        if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            parent = OmegaConf.select(cfg, key.rpartition(".")[0])
            valid = f"; {key.rpartition('.')[0]} has: {', '.join(parent)}" \
                if OmegaConf.is_dict(parent) else ""
            raise ConfigError("hydra.sweeper.params", key, f"not a key of this config{valid} "
                              f"(for loss=dkd: hparams_search=dkd_optuna)")


_ABSENT = object()


def _check_writable(key: str, folder: str) -> None:
    """Fail before Hydra creates anything if ``folder`` cannot be written, or its disk
    is full (Hydra's own files, written first, would fail with a traceback)."""
    existing = nearest_existing(Path(folder).expanduser().resolve())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        reason = "is on a read-only file system" if read_only(existing) else \
            "is not a writable folder"
        raise ConfigError(key, folder, f"{existing} {reason}; choose another {key}")
    free = free_bytes(existing)
    if free < MIN_FREE_BYTES:
        raise ConfigError(key, folder, f"no space left on the device of {existing} "
                                       f"({free / 1e3:.0f} kB free); free some, or choose "
                                       f"another {key}")


# what a run writes before its first stage (Hydra's config files, kdrun.log, metrics.csv)
MIN_FREE_BYTES = 256_000


def read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def _expand(overrides: list[str]) -> list[list[str]]:
    """The override list of each job of a ``-m`` sweep, as Hydra's basic sweeper makes them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise UserError(_hydra_message_on_one_line(str(e))) from e
    if any(o.value_type == ValueType.INTERVAL_SWEEP for o in parsed):  # Optuna's interval(a,b)
        overrides = [f"{o.get_key_element()}={o.value().start},{o.value().end}"
                     if o.value_type == ValueType.INTERVAL_SWEEP else o.input_line for o in parsed]
        parsed = OverridesParser.create().parse_overrides(overrides)  # check both ends
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _check_group_choices(overrides: list[str]) -> None:
    """``dataset=foo``: say which options the group has, in one line."""
    search_path = _search_path(overrides)
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        if key.startswith("hydra") or "." in key or not (files(CONFIG_MODULE) / key).is_dir():
            continue
        options = group_options(key, search_path)
        if value not in options and not (key == "experiment" and value == "null"):
            raise ConfigError(key, value, f"not a known option; valid: {', '.join(options)}")


def _search_path(overrides: list[str]) -> tuple[str, ...]:
    """The folders of ``hydra.searchpath=[file://...]``: where a user keeps own configs."""
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "hydra.searchpath":
            entries = value.strip("[]").split(",")
            return tuple(e.strip().removeprefix("file://") for e in entries
                         if e.strip().startswith("file://"))
    return ()


def _check_optional_packages(overrides: list[str]) -> None:
    """``hydra/launcher=submitit_slurm`` without its plugin installed: say which extra
    to install, in one line, instead of Hydra's traceback at launch time."""
    import importlib.util

    for item in overrides:
        key, _, value = item.lstrip("+").partition("=")
        module, extra = OPTIONAL.get((key, value), (None, None))
        if module and importlib.util.find_spec(module) is None:
            raise ConfigError(key, value, f"needs the optional package {module.split('.')[-1]}: "
                                          f"pip install 'kdrun[{extra}]'")


def _check_slurm_commands(overrides: list[str]) -> None:
    """submitit_slurm where Slurm is not: one line, not submitit's traceback at launch."""
    if "hydra/launcher=submitit_slurm" in overrides:
        missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
        if missing:
            raise ConfigError("hydra/launcher", "submitit_slurm",
                              f"Slurm's {' and '.join(missing)} not found on PATH: run kdrun "
                              f"on the cluster's login node (hydra/launcher=submitit_local "
                              f"runs the same jobs on this machine)")


def _unknown_key_message(message: str, job: list[str], compose) -> str | None:
    """``loss.Tx=3``: name the keys that ``loss`` does have."""
    import re

    found = re.search(r"Could not override '([^']+)'", message)
    if not found or "." not in found.group(1):
        return None
    key = found.group(1)
    parent, _, leaf = key.rpartition(".")
    try:
        node = OmegaConf.select(compose("config", overrides=[
            o for o in job if o.partition("=")[0].lstrip("+~") != key]), parent)
    except Exception:  # another problem in the same command line: Hydra's message then
        return None
    if not OmegaConf.is_dict(node):
        return None
    return (f"{key}: {parent} has no key {leaf!r}; valid: {', '.join(node)} "
            f"(to add a new key: +{key}=...)")


def _hydra_message_on_one_line(message: str) -> str:
    noise = ("full_key:", "object_type", "reference_type", "Set the environment variable")
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    text = "; ".join(ln for ln in lines if not ln.startswith(noise))
    if re.search(r"=~", message):  # the shell expands ~ only at the start of a word
        text += ("; a ~ after '=' is not expanded by the shell, and Hydra cannot parse it: "
                 "write $HOME/... or a relative path")
    return text

