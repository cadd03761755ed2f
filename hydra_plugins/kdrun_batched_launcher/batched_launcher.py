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
        from kdrun.sweep.compose import compose_each_job_once

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
