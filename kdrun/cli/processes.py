"""kdrun on several processes (kdrun/distributed.py), as the command sees them: started by
torchrun or as the tasks of a Slurm job, they meet before the pipeline runs; rank 0 runs it
as a single process would, the others follow it silently in temporary folders."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kdrun import distributed
from kdrun.errors import UserError
from kdrun.run import pipeline
from kdrun.run.validate import check_processes

FOLLOWER_HYDRA_DIR = "kdrun-hydra-follower-"


@contextlib.contextmanager
def processes_joined(cfg: DictConfig):
    """Inside: this process among the others it was started with (torchrun, or the tasks
    of a Slurm job), data parallel (kdrun/distributed.py); alone when it was started alone."""
    launched = distributed.launched_world()
    if not launched.parallel:
        yield launched
        return
    backend = check_processes(cfg, launched)
    world = distributed.join(launched, backend, cfg.distributed.timeout_min)
    try:
        yield world
    except BaseException:
        distributed.leave(together=False)  # the others may never get here
        raise
    distributed.leave()


def follow(cfg: DictConfig) -> float:
    """A process other than rank 0: the same pipeline, silent, in a temporary folder that
    is removed afterwards (rank 0 writes the run's files and the stage cache)."""
    cfg.progress = False
    cfg.logger.name = "csv"  # rank 0's TensorBoard files or MLflow run are the run's
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):  # Slurm tasks share the job's log
            root.removeHandler(handler)
        else:
            handler.setLevel(logging.ERROR)
    # torchrun stops the others with SIGTERM when one fails: leave through the finally blocks
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix=f"kdrun-rank{distributed.world().rank}-") as folder:
        pipeline.run(cfg, folder)
    hydra_folder = Path(HydraConfig.get().runtime.output_dir)
    if hydra_folder.name.startswith(FOLLOWER_HYDRA_DIR):  # the empty one torchrun_arguments made
        shutil.rmtree(hydra_folder, ignore_errors=True)
    return float("nan")


def follower() -> bool:
    """Whether this process is one of several and not rank 0 (after processes_joined)."""
    return int(os.environ.get("RANK", "0")) > 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1


def started_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def torchrun_arguments(argv: list[str]) -> list[str]:
    """Under torchrun, the processes other than rank 0 keep Hydra's files out of the
    outputs (Hydra would give each its own timestamped run folder)."""
    if not started_by_torchrun():
        return argv
    if "-m" in argv or "--multirun" in argv:
        raise UserError("kdrun -m under torchrun: torchrun starts the processes of one run; "
                        "run each job of a sweep with torchrun, or spread a sweep over Slurm "
                        "with hydra.launcher.tasks_per_node=N")
    if not follower():
        return argv
    return [*argv, f"hydra.run.dir={tempfile.mkdtemp(prefix=FOLLOWER_HYDRA_DIR)}",
            "hydra.output_subdir=null", "hydra/job_logging=none"]
