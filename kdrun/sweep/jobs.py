"""A sweep folder as its jobs left it: which jobs started, which finished (a
summary.csv), which failed (failed.json), each finished job's setting (its overrides
less its replicate keys and those that cannot change results), and their summary or
metric rows in one frame. Hydra does not hand job results to callbacks: this is read
from the files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from kdrun.run.provenance import REPLICATE_KEYS, outside_the_key
from kdrun.store.columns import current_columns


class NoFinishedJobs(FileNotFoundError):
    pass


def job_dirs(sweep_dir: Path) -> tuple[list[Path], list[Path]]:
    """(started, finished) job directories: those with Hydra's record, those with a summary."""
    started = sorted(p.parent for p in sweep_dir.rglob(".hydra") if p.parent != sweep_dir)
    finished = sorted(p.parent for p in sweep_dir.rglob("summary.csv") if p.parent != sweep_dir)
    return started, finished


def failed_jobs(sweep_dir: Path) -> dict[str, str]:
    """Job folder (relative to the sweep) -> the one-line error of each job that failed."""
    return {str(p.parent.relative_to(sweep_dir)): json.loads(p.read_text())["error"]
            for p in sorted(sweep_dir.rglob("failed.json"))
            if not (p.parent / "summary.csv").exists()}


def job_setting(job_dir: Path) -> dict[str, str]:
    """The job's overrides that define its computation, less its replicate keys."""
    path = job_dir / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.to_container(OmegaConf.load(path)) if path.exists() else []
    setting = {}
    for item in overrides or []:
        key, _, value = item.partition("=")
        key = key.lstrip("+~")
        if key not in REPLICATE_KEYS and not outside_the_key(key) and not key.startswith("hydra"):
            setting[key] = value
    return setting


@dataclass
class Jobs:
    """A sweep's jobs, read once: which started, which finished, and each finished
    job's setting; ``swept`` are the setting keys whose values differ between jobs,
    ``common`` the ones all share."""

    root: Path
    started: list[Path]
    settings: dict[Path, dict[str, str]]
    swept: list[str]
    common: dict[str, str]


def read_jobs(sweep_dir: Path) -> Jobs:
    started, finished = job_dirs(sweep_dir)
    if not finished:
        raise NoFinishedJobs(f"no finished job (*/summary.csv) under {sweep_dir}: "
                             f"not a kdrun sweep directory, or no job has finished yet")
    settings = {d: job_setting(d) for d in finished}
    keys = sorted({k for setting in settings.values() for k in setting})
    swept = [k for k in keys if len({s.get(k) for s in settings.values()}) > 1]
    common = {k: v for k, v in settings[finished[0]].items() if k not in swept}
    return Jobs(sweep_dir, started, settings, swept, common)


def collect(jobs: Jobs, which: str) -> pd.DataFrame:
    """All finished jobs' summary.csv or metrics.csv, with a ``job`` column and one
    column per swept key; an older kdrun's column names read as today's."""
    frames = [current_columns(pd.read_csv(d / which)).assign(
                  job=str(d.relative_to(jobs.root)), **{k: setting.get(k, "-") for k in jobs.swept})
              for d, setting in jobs.settings.items()]
    return _as_numbers(pd.concat(frames, ignore_index=True), jobs.swept)


def _as_numbers(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Swept keys whose values are all numbers as numbers (split.labeled=250 sorts before
    1000); "-" (a key a job lacks) becomes empty."""
    for key in keys:
        values = frame[key].replace("-", None)
        numbers = pd.to_numeric(values, errors="coerce")
        if numbers.notna().sum() == values.notna().sum() and values.notna().any():
            frame[key] = numbers
    return frame
