"""hydra/launcher=batched: a sweep's students trained together as stacked models, then
every job run as Hydra's basic launcher runs it (kdrun/sweep/batched.py). Its settings
are configs/hydra/launcher/batched.yaml."""


import copy
import logging
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict, read_write

log = logging.getLogger(__name__)


class BatchedLauncher(Launcher):
    def __init__(self, max_members: int | None = None) -> None:
        super().__init__()
        self.max_members = max_members
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        compose_each_job_once(hydra_context.config_loader)

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from kdrun.sweep.batched import train_sweep_stages
        from kdrun.sweep.launch import fit_to_launcher

        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        configs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            config = self.hydra_context.config_loader.load_sweep_config(self.config,
                                                                        list(overrides))
            with open_dict(config):
                config.hydra.job.id = config.hydra.job.num = idx
            configs.append(config)
        log.info("Launching %d jobs, their students batched", len(configs))
        HydraConfig.instance().set_config(configs[0])
        tasks = []
        for config in configs:  # what the task function gets: the config without hydra
            task = copy.deepcopy(config)
            with read_write(task), open_dict(task):
                del task["hydra"]
            fit_to_launcher(task, config.hydra)
            tasks.append(task)
        trained = train_sweep_stages(tasks, sweep_dir / ".batched",
                                       max_members=self.max_members)
        log.info("batched launcher: %d stages trained in stacked groups; running the jobs",
                 trained)
        runs = []
        for config in configs:  # each job prints its own line (kdrun/cli/main.py)
            runs.append(run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                                config=config, job_dir_key="hydra.sweep.dir",
                                job_subdir_key="hydra.sweep.subdir"))
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return runs


def compose_each_job_once(config_loader) -> None:
    """Hydra's sweeper composes every job of a batch to validate it, then the launcher
    composes it again ("this repeats work the launcher will do", says Hydra), ~0.14 s a
    job here. Both run in this process: the launcher gets a copy of the first. And jobs
    that differ only in plain values (``loss.T=2``) are composed once per set of their
    other overrides, then given their values as Hydra gives them (``OmegaConf.update``
    in order, as kdrun's preflight does), their task overrides and their folder name.
    tests/test_batched.py compares the result with Hydra's own composition."""
    compose = config_loader.load_sweep_config
    if getattr(compose, "kdrun_once", False):
        return
    composed: dict = {}

    def once(master_config: DictConfig, sweep_overrides):
        key = (id(master_config), tuple(sweep_overrides))
        if key not in composed:
            try:
                job = reuse_composition(master_config, list(sweep_overrides), compose, composed)
            except Exception:  # let Hydra's own composition name the problem
                job = compose(master_config, list(sweep_overrides))
            composed[key] = (master_config, job)
        return copy.deepcopy(composed[key][1])

    once.kdrun_once = True
    config_loader.load_sweep_config = once


def reuse_composition(master_config: DictConfig, overrides: list[str], compose,
                      composed: dict) -> DictConfig:
    """``compose(master_config, overrides)``, from the composition of the job's overrides
    less its plain value overrides (kdrun.sweep.compose.split_plain) when one exists (else made and
    kept), given the job's values, task overrides and folder name as Hydra gives them."""
    from hydra._internal.config_loader_impl import get_overrides_dirname  # Hydra's own; if it

    # moves, the ImportError sends every job to a full composition
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from kdrun.sweep.compose import split_plain, with_values

    parsed = OverridesParser.create().parse_overrides(overrides)
    plain, rest = split_plain(parsed)
    if not plain:
        return compose(master_config, overrides)
    key = ("base", id(master_config), rest)
    if key not in composed:
        composed[key] = (master_config, compose(master_config, list(rest)))
    cfg = with_values(composed[key][1], plain)
    app = [o for o in parsed if not o.is_hydra_override()]
    dirname = cfg.hydra.job.config.override_dirname
    with open_dict(cfg.hydra):
        cfg.hydra.overrides.task = [o.input_line for o in app]
        cfg.hydra.job.override_dirname = get_overrides_dirname(
            overrides=app, kv_sep=dirname.kv_sep, item_sep=dirname.item_sep,
            exclude_keys=dirname.exclude_keys)
    return cfg
