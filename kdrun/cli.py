"""The ``kdrun`` command: Hydra composes the config, kdrun validates it and runs
the pipeline into Hydra's output directory.

Before Hydra starts, every job's config (one, or each point of a ``-m`` sweep)
is composed and validated, so a typo fails in a second with one line on stderr
and exit code 2, before anything is trained or written. ``HYDRA_FULL_ERROR=1``
shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from importlib.resources import files
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kdrun import pipeline
from kdrun.errors import ConfigError, UserError
from kdrun.validate import validate

CONFIG_MODULE = "kdrun.configs"
SWEEP_FLAGS = ("-m", "--multirun")


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    """One job. Returns the distilled student's validation accuracy (what a
    Hydra sweeper such as Optuna maximises)."""
    try:
        validate(cfg)
        if cfg.num_threads is None:
            cfg.num_threads = threads_per_job(HydraConfig.get())
        return pipeline.run(cfg, HydraConfig.get().runtime.output_dir)["distilled_val_acc"]
    except UserError as e:
        fail(e)


def threads_per_job(hydra_cfg) -> int | None:
    """CPU threads for one job: torch's default alone, an equal share of the cores when
    a launcher runs several jobs at once (two 2-thread jobs on 2 cores run many times
    slower than one)."""
    parallel = hydra_cfg.launcher.get("n_jobs") if "launcher" in hydra_cfg else None
    if not parallel or parallel == 1:
        return None
    import torch

    cores = os.cpu_count() or 1
    jobs = cores if parallel < 0 else min(parallel, cores)
    return max(1, min(torch.get_num_threads(), cores) // jobs)


def main() -> None:
    try:
        preflight(sys.argv[1:])
    except UserError as e:
        fail(e)
    hydra_main()


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
    jobs = _expand(overrides) if any(a in SWEEP_FLAGS for a in argv) else [overrides]
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        for job in jobs:
            _check_group_choices(job)
            try:
                cfg = compose("config", overrides=job)
            except HydraException as e:
                raise UserError(_hydra_message_on_one_line(str(e))) from e
            validate(cfg)
            _check_writable(cfg.output_root)


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
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise UserError(_hydra_message_on_one_line(str(e))) from e
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _check_group_choices(overrides: list[str]) -> None:
    """``dataset=foo``: say which options the group has, in one line."""
    root = files(CONFIG_MODULE)
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        if key.startswith("hydra") or "." in key or not (root / key).is_dir():
            continue
        options = sorted(p.name.removesuffix(".yaml") for p in (root / key).iterdir()
                         if p.name.endswith(".yaml"))
        if value not in options and not (key == "experiment" and value == "null"):
            raise ConfigError(key, value, f"not a known option; valid: {', '.join(options)}")


def _hydra_message_on_one_line(message: str) -> str:
    noise = ("full_key:", "object_type", "reference_type", "Set the environment variable")
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    return "; ".join(ln for ln in lines if not ln.startswith(noise))


if __name__ == "__main__":
    main()
