"""The ``kdrun`` command: Hydra composes the config, kdrun validates it and runs
the pipeline into Hydra's output directory.

Before Hydra starts, every job's config (one, or each point of a ``-m`` sweep)
is composed and validated (kdrun/cli/preflight.py), so a typo fails in a second with
one line on stderr and exit code 2, before anything is trained or written.
``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from kdrun.cli.preflight import CONFIG_MODULE, preflight
from kdrun.cli.processes import follow, follower, processes_joined, torchrun_arguments
from kdrun.errors import UserError
from kdrun.run import pipeline
from kdrun.run.search import sweep_values
from kdrun.run.validate import validate
from kdrun.store.files import RunDir
from kdrun.sweep.launch import fit_to_launcher
from kdrun.sweep.report import SweepReport
from kdrun.sweep.slurm_jobs import watch_submitit
from kdrun.train.progress import on_terminal, where_now

# configs/hydra/launcher/ refines the launcher plugins' own configs under their own names
# (hydra/launcher=joblib stays what users type); Hydra then checks ours against the
# plugin's schema, as intended, and warns that this check is deprecated. Set on import,
# so that joblib's worker processes, which import this module for the task, have it too.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against")


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="config")
def hydra_main(cfg: DictConfig) -> float | list[float]:
    """One job. Returns ``search.objectives`` (kdrun/run/search.py): by default the
    distilled student's validation accuracy, what a Hydra sweeper such as Optuna
    maximises."""
    hydra_cfg = HydraConfig.get()
    run_dir = RunDir(hydra_cfg.runtime.output_dir)
    for mark in (run_dir.failed_json, run_dir.interrupted_json):  # a job run again
        mark.unlink(missing_ok=True)
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        validate(cfg)
        fit_to_launcher(cfg, hydra_cfg)
        with processes_joined(cfg) as world:
            if not world.writer:  # it writes nothing: its run folder is a temporary one
                return follow(cfg)
            with console_quiet() if sweep else contextlib.nullcontext():
                result = pipeline.run(cfg, run_dir.root)
        if sweep:  # the job's table is in its kdrun.log; the console gets one line
            print(f"job {job_name(hydra_cfg)}: {result['line']} ({shown_path(run_dir.root)})",
                  flush=True)
        return sweep_values(cfg.search.objectives, result)
    except KeyboardInterrupt:
        if not follower():
            with contextlib.suppress(UserError):
                run_dir.mark_interrupted(where_now(), resume_hint())
        raise
    except UserError as e:
        if hydra_cfg.mode != RunMode.MULTIRUN or follower():
            fail(e)
        # one job of a sweep: the others go on, and the sweep report lists this one as
        # failed with its line; NaN is what Optuna takes for a failed trial
        with contextlib.suppress(UserError):  # a full disk: the line below still says it
            run_dir.mark_failed(one_line_message(e))
        print(f"kdrun: error: job {job_name(hydra_cfg)}: {one_line_message(e)}",
              file=sys.stderr)
        nan = float("nan")
        return nan if len(cfg.search.objectives) == 1 else [nan] * len(cfg.search.objectives)


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


def register_batched_launcher() -> None:
    """hydra/launcher=batched ships in kdrun's hydra_plugins package, where Hydra's plugin
    discovery finds it in a regular install; an editable install (pip install -e) hides
    it from that scan, so it is also registered here, which is harmless twice."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.kdrun_batched_launcher.batched_launcher import BatchedLauncher

    Plugins.instance().register(BatchedLauncher)


def main() -> None:
    # a log line that cannot be written (a full disk under kdrun.log) is dropped, not
    # printed as a traceback; kdrun's own next write names the fault in one line
    logging.raiseExceptions = False
    register_batched_launcher()
    for name in LAUNCHER_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        sys.argv = [sys.argv[0], *torchrun_arguments(sys.argv[1:])]
        cfg = preflight(sys.argv[1:])
    except UserError as e:
        fail(e)
    if cfg is not None and any(a.startswith("hydra/launcher=submitit_") for a in sys.argv):
        watch_submitit(cfg.slurm.vanished_after_s)  # kdrun/sweep/slurm_jobs.py
    try:
        hydra_main()
        if SweepReport.status:  # a sweep ran every job, and some failed (its report says)
            sys.exit(SweepReport.status)
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback; the run folder is marked
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if follower():  # rank 0 says it, once
            sys.exit(130)
        where = where_now()
        newline = "\n" if on_terminal() else ""  # after the ^C the terminal echoes
        print(f"{newline}kdrun: interrupted{f' in {where}' if where else ''}; {resume_hint()}",
              file=sys.stderr)
        sys.exit(130)


def fail(error: UserError):
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    if follower():  # rank 0 says it, once
        sys.exit(2)
    print(f"kdrun: error: {one_line_message(error)}", file=sys.stderr)
    sys.exit(2)


def one_line_message(error: UserError) -> str:
    """The error's own message; for one raised in a DataLoader worker (which PyTorch
    re-raises with the worker's traceback folded into the text) its last line."""
    lines = str(error).strip().splitlines()
    last = lines[-1] if lines else type(error).__name__
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return last.removeprefix(prefix)


if __name__ == "__main__":
    main()
