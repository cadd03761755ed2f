"""The ``kdrun`` command: Hydra composes the config, kdrun validates it and runs
the pipeline into Hydra's output directory.

Before Hydra starts, every job's config (one, or each point of a ``-m`` sweep)
is composed and validated, so a typo fails in a second with one line on stderr
and exit code 2, before anything is trained or written. ``HYDRA_FULL_ERROR=1``
shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from importlib.resources import files
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kdrun import pipeline
from kdrun.errors import ConfigError, UserError
from kdrun.progress import on_terminal, where_now
from kdrun.slurm_logs import quiet_submitit
from kdrun.store import RunDir
from kdrun.validate import group_options, validate

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


def parallel_jobs() -> int:
    """Default number of parallel jobs for the joblib launcher: one per GPU, or one per
    CPU core on a machine without one."""
    import torch

    return torch.cuda.device_count() or os.cpu_count() or 1


OmegaConf.register_new_resolver("kdrun_parallel_jobs", parallel_jobs, replace=True)
# configs/hydra/launcher/ refines the launcher plugins' own configs under their own names
# (hydra/launcher=joblib stays what users type); Hydra then checks ours against the
# plugin's schema, as intended, and warns that this check is deprecated. Set on import,
# so that joblib's worker processes, which import this module for the task, have it too.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against")


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    """One job. Returns the distilled student's validation accuracy (what a
    Hydra sweeper such as Optuna maximises)."""
    hydra_cfg = HydraConfig.get()
    run_dir = RunDir(hydra_cfg.runtime.output_dir)
    for mark in (run_dir.failed_json, run_dir.interrupted_json):  # a job run again
        mark.unlink(missing_ok=True)
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        validate(cfg)
        fit_to_launcher(cfg, hydra_cfg)
        with console_quiet() if sweep else contextlib.nullcontext():
            result = pipeline.run(cfg, run_dir.root)
        if sweep:  # the job's table is in its kdrun.log; the console gets one line
            print(f"job {job_name(hydra_cfg)}: {result['line']} ({shown_path(run_dir.root)})",
                  flush=True)
        return result["distilled_val_acc"]
    except KeyboardInterrupt:
        run_dir.mark_interrupted(where_now(), resume_hint())
        raise
    except UserError as e:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            fail(e)
        # one job of a sweep: the others go on, and the sweep report lists this one as
        # failed with its line; NaN is what Optuna takes for a failed trial
        run_dir.mark_failed(one_line_message(e))
        print(f"kdrun: error: job {job_name(hydra_cfg)}: {one_line_message(e)}",
              file=sys.stderr)
        return float("nan")


def resume_hint() -> str:
    """How to go on after an interruption: the same command (the stage cache holds every
    finished epoch), into the same sweep folder for a sweep."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return (f"run the same command with hydra.sweep.dir={HydraConfig.get().sweep.dir} "
                f"to resume")
    return "run the same command to resume"


def shown_path(path) -> str:
    """``path`` relative to the working directory when it lies under it."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def job_name(hydra_cfg) -> str:
    """A sweep job as its folder names it (its overrides), else its number."""
    return hydra_cfg.job.override_dirname or f"#{hydra_cfg.job.num}"


@contextlib.contextmanager
def console_quiet():
    """Inside: the console shows warnings and errors only, while the job's log file
    (Hydra's kdrun.log) still gets everything: a sweep's console has one line per job."""
    handlers = [h for h in logging.getLogger().handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    levels = [h.level for h in handlers]
    for handler in handlers:
        handler.setLevel(max(handler.level, logging.WARNING))
    try:
        yield
    finally:
        for handler, level in zip(handlers, levels):
            handler.setLevel(level)


# Launchers' own log line per job ("#3 : loss.T=4 ..."): kdrun prints its one line instead
LAUNCHER_LOGGERS = ("hydra._internal.core_plugins.basic_launcher",
                    "hydra_plugins.hydra_joblib_launcher._core")


def fit_to_launcher(cfg: DictConfig, hydra_cfg) -> None:
    """The job's CPU threads and device, as its launcher runs it (the batched launcher's
    planning applies this too: the device is in every stage key)."""
    if cfg.num_threads is None:
        cfg.num_threads = threads_per_job(hydra_cfg)
    cfg.device = device_for_job(cfg.device, hydra_cfg)


def parallel_jobs_of(hydra_cfg) -> int:
    """How many jobs the launcher runs at once: 1 for Hydra's basic launcher (and
    launchers without ``n_jobs``), -1 for joblib's "one per core"."""
    launcher = hydra_cfg.get("launcher") or {}
    return launcher.get("n_jobs") or 1


def threads_per_job(hydra_cfg) -> int | None:
    """CPU threads for one job: torch's default alone, an equal share of the cores when
    a launcher runs several jobs at once (two 2-thread jobs on 2 cores run many times
    slower than one)."""
    parallel = parallel_jobs_of(hydra_cfg)
    if parallel == 1:
        return None
    import torch

    cores = os.cpu_count() or 1
    jobs = cores if parallel < 0 else min(parallel, cores)
    return max(1, min(torch.get_num_threads(), cores) // jobs)


def device_for_job(device: str, hydra_cfg) -> str:
    """With a parallel launcher on a machine with several GPUs, job k gets GPU
    k mod (number of GPUs) unless the config names one (cuda:N or cpu)."""
    if device not in ("auto", "cuda") or parallel_jobs_of(hydra_cfg) == 1:
        return device
    import torch

    count = torch.cuda.device_count()
    return f"cuda:{hydra_cfg.job.num % count}" if count > 1 else device


def register_batched_launcher() -> None:
    """hydra/launcher=batched ships in kdrun's hydra_plugins package, where Hydra's plugin
    discovery finds it in a regular install; an editable install (pip install -e) hides
    it from that scan, so it is also registered here, which is harmless twice."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.kdrun_batched_launcher.batched_launcher import BatchedLauncher

    Plugins.instance().register(BatchedLauncher)


def main() -> None:
    register_batched_launcher()
    for name in LAUNCHER_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if "hydra/launcher=submitit_slurm" in sys.argv:
        quiet_submitit()  # one line, not one per status poll, on a Slurm without accounting
    try:
        preflight(sys.argv[1:])
    except UserError as e:
        fail(e)
    try:
        hydra_main()
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback; the run folder is marked
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        where = where_now()
        newline = "\n" if on_terminal() else ""  # after the ^C the terminal echoes
        print(f"{newline}kdrun: interrupted{f' in {where}' if where else ''}; {resume_hint()}",
              file=sys.stderr)
        sys.exit(130)


def fail(error: UserError):
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"kdrun: error: {one_line_message(error)}", file=sys.stderr)
    sys.exit(2)


def one_line_message(error: UserError) -> str:
    """The error's own message; for one raised in a DataLoader worker (which PyTorch
    re-raises with the worker's traceback folded into the text) its last line."""
    lines = str(error).strip().splitlines()
    last = lines[-1] if lines else type(error).__name__
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return last.removeprefix(prefix)


def preflight(argv: list[str]) -> None:
    """Compose and validate the config of every job the command line asks for."""
    if any(a.startswith("-") and a not in SWEEP_FLAGS for a in argv):
        return  # --help, --cfg, -cp, ...: Hydra's own flags, Hydra handles them
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    overrides = [a for a in argv if a not in SWEEP_FLAGS]
    sweep = any(a in SWEEP_FLAGS or a.startswith(SWEEPER_CHOICES) for a in argv)
    jobs = _expand(overrides) if sweep else [overrides]
    composed: dict[tuple[str, ...], DictConfig] = {}
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        for job in jobs:
            _check_group_choices(job)
            _check_optional_packages(job)
            cfg = _reuse_composition(job, compose, composed)
            if cfg is None:
                try:
                    cfg = compose("config", overrides=job)
                except HydraException as e:
                    raise UserError(_unknown_key_message(str(e), job, compose) or
                                    _hydra_message_on_one_line(str(e))) from e
            validate(cfg)
            _check_search_space(job, compose)
            _check_writable(cfg.output_root)
            if cfg.logger.name == "mlflow" and cfg.logger.get("tracking_uri"):
                from kdrun.mlflow_log import check_reachable

                check_reachable(cfg.logger.tracking_uri)  # before anything trains


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


def split_plain(parsed: list) -> tuple[list, tuple[str, ...]]:
    """A job's parsed overrides split into its plain ``a.b=value`` ones and the rest (as
    typed). Hydra composes the config groups and the other overrides, then applies each
    plain one in order with ``OmegaConf.update(cfg, key, value, merge=True)`` on the
    struct config: so a composition without them, copied and given them
    (``with_values``), is the job's. Shared by preflight and the batched launcher."""
    from hydra.core.override_parser.types import OverrideType

    plain = [o for o in parsed if o.type == OverrideType.CHANGE and o.package is None
             and "." in o.key_or_group and "/" not in o.key_or_group
             and not o.is_hydra_override() and not o.is_sweep_override()]
    return plain, tuple(o.input_line for o in parsed if o not in plain)


def with_values(cfg: DictConfig, plain: list) -> DictConfig:
    """A copy of ``cfg`` with the plain overrides applied, in order, as Hydra applies them."""
    import copy

    cfg = copy.deepcopy(cfg)
    for override in plain:
        OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
    return cfg


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


def _check_writable(folder: str) -> None:
    """Fail before Hydra creates anything if the output folder cannot be written."""
    path = Path(folder).expanduser().resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("output_root", folder, f"{existing} is not a writable folder; "
                          f"choose another output_root")


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


if __name__ == "__main__":
    main()
