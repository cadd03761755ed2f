"""A sweep's analysis: the distilled students' paired gain per setting with its test and
verdict (kdrun/report/statistics.py, as the run's table computes it), the best setting
chosen on validation, and how the stages were computed; a ``SweepAnalysis`` record that
kdrun/sweep/report.py renders."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from kdrun.data.metrics import Metric
from kdrun.report.statistics import gain_test, paired_gain
from kdrun.report.table import summary_metric
from kdrun.run.provenance import rounding_columns
from kdrun.sweep.jobs import Jobs, failed_jobs

# Summary columns that must match for jobs to be pooled, swept or not.
CONDITION_KEYS = ("device", "precision", "torch", "data_sha256")


@dataclass
class SweepAnalysis:
    """What a sweep's report says, before it is written in any form."""

    sweep_dir: Path
    table: pd.DataFrame  # one row per setting (gains_by_setting)
    swept: list[str]  # the setting keys whose values differ between jobs
    keys: list[str]  # the table's columns that name a setting
    best: pd.Series | None  # the setting selected on validation
    started: int
    finished: int
    common: dict[str, str]  # the setting keys every finished job shares
    failed: dict[str, str]  # job folder -> its one-line error
    trained: str | None  # how_trained's sentence
    orders: str | None  # other_orders' sentence
    metric: Metric


def analyse(jobs: Jobs, summary: pd.DataFrame) -> SweepAnalysis:
    """The analysis of a sweep's jobs and their summary rows (jobs.collect)."""
    table = gains_by_setting(summary, jobs.swept)
    metric = summary_metric(summary)
    return SweepAnalysis(jobs.root, table, jobs.swept, setting_keys(table, jobs.swept),
                         best_setting(table, metric), len(jobs.started), len(jobs.settings),
                         jobs.common, failed_jobs(jobs.root), how_trained(summary),
                         other_orders(summary), metric)


def gains_by_setting(summary: pd.DataFrame, swept: list[str]) -> pd.DataFrame:
    """One row per setting: the distilled students' metric, their paired gain over
    scratch (tested over student seeds under one teacher, or over teachers' mean gains
    under several, helping or hurting as the metric's direction says), the teacher's."""
    metric = summary_metric(summary)
    keys = swept + unexplained_conditions(summary, swept)
    scratch = summary[summary.role == "scratch"]
    teachers = summary[summary.role == "teacher"].set_index("job")
    distilled = summary[summary.role == "distilled"].reset_index(drop=True)
    distilled["gain"] = paired_gain(scratch, distilled, "test_metric_best_val", by=("job", "seed"))
    distilled["teacher_metric"] = distilled.job.map(teachers.test_metric_best_val)
    # which teacher taught each student: its stage key, or (an ensemble) its seed; none
    # at all in deep mutual learning
    seeds = "seed " + teachers.seed.astype(str) if "seed" in teachers else pd.Series(dtype=str)
    teacher_key = teachers.cache_key.fillna(seeds) if "cache_key" in teachers else seeds
    distilled["teacher"] = distilled.job.map(teacher_key).fillna("none")
    # the same student twice (jobs that differ only in settings without effect): once
    distilled = distilled.drop_duplicates(["teacher", "seed", *keys])
    for column in ("soft_target_entropy", "T", "alpha", "method"):
        if column not in distilled:
            distilled[column] = float("nan")
    groups = distilled.groupby(keys, dropna=False, sort=True) if keys else [((), distilled)]
    rows = []
    for setting, group in groups:
        setting = setting if isinstance(setting, tuple) else (setting,)
        rows.append({**dict(zip(keys, setting)), **_setting_row(group, metric)})
    return pd.DataFrame(rows)


def unexplained_conditions(summary: pd.DataFrame, swept: list[str]) -> list[str]:
    """The CONDITION_KEYS (device, precision, torch, data) that differ between jobs of
    one combination of swept keys: they keep settings apart as swept keys do. One that
    differs only with the swept keys (the data of a sweep over split.labeled) is named by
    them already."""
    varying = [c for c in CONDITION_KEYS if c in summary and summary[c].nunique() > 1]
    if not swept:
        return varying
    within = summary.groupby(swept, dropna=False)
    return [c for c in varying if (within[c].nunique() > 1).any()]


def _setting_row(group: pd.DataFrame, metric: Metric) -> dict:
    per_teacher = group.groupby("teacher", sort=False).gain
    means = list(per_teacher.mean())
    nested = len(means) > 1
    test = gain_test(means if nested else list(group.gain), metric)
    within = [v for v in per_teacher.var().tolist() if not math.isnan(v)]
    return {
        "method": group.method.iloc[0], "T": group["T"].iloc[0], "alpha": group.alpha.iloc[0],
        "teachers": len(means), "students": len(group),
        "teacher_metric": group.drop_duplicates("teacher").teacher_metric.mean(),
        "val_metric": group.val_metric_best.mean(),
        "test_metric": group.test_metric_best_val.mean(),
        "test_std": _std(group.test_metric_best_val),
        "gain": test.mean, "gain_std": test.std,
        "within_teacher_std": math.sqrt(statistics.mean(within)) if within else float("nan"),
        "gain_ci_low": test.ci_low, "gain_ci_high": test.ci_high, "p": test.p,
        "interval_over": (f"{len(means)} teachers' mean gains" if nested
                          else f"{len(group)} student seeds, 1 teacher"),
        "soft_target_entropy": group.soft_target_entropy.mean(), "verdict": test.verdict,
        "jobs": sorted(set(group.job)), **_examples(group),
    }


def _examples(group: pd.DataFrame) -> dict:
    """How many labelled (train + val) and unlabelled examples the setting's distilled
    students had, when the summaries say."""
    if "train_unlabeled" not in group or group.train_unlabeled.isna().all():
        return {}
    row = group.iloc[0]
    return {"labelled": int(row.train_labeled + row.val_examples),
            "unlabelled": int(row.train_unlabeled)}


def _std(values) -> float:
    values = list(values)
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def setting_keys(table: pd.DataFrame, swept: list[str]) -> list[str]:
    """The columns of a gains_by_setting table that name its settings: the swept keys,
    then any condition that keeps settings apart."""
    return [k for k in table.columns if k in swept or k in CONDITION_KEYS]


def best_setting(table: pd.DataFrame, metric: Metric) -> pd.Series | None:
    """The setting whose distilled students score best on *validation*; None without a
    validation split."""
    if not table.val_metric.notna().any():
        return None
    best = table.val_metric.idxmax() if metric.higher_is_better else table.val_metric.idxmin()
    return table.loc[best]


def how_trained(summary: pd.DataFrame) -> str | None:
    """A sentence on how many of the sweep's stages trained in stacked batches and how
    many alone, when any did stacked (their numbers agree with alone to rounding, not
    bit for bit); None otherwise."""
    if "trained_in" not in summary or "cache_key" not in summary:
        return None
    stages = summary.drop_duplicates("cache_key")
    stacked = stages.trained_in.astype(str).str.startswith("a stacked batch")
    if not stacked.any():
        return None
    return (f"Of its {len(stages)} stages, {int(stacked.sum())} trained in stacked batches "
            f"(`hydra/launcher=batched`) and {int((~stacked).sum())} alone (`trained_in` in "
            "summary.csv): stacked and alone compute the same maths in another summation "
            "order, so their weights agree to rounding, not bit for bit.")


def other_orders(summary: pd.DataFrame) -> str | None:
    """A sentence naming the rounding-only settings (threads, processor, ...) in which
    the sweep's stages differ, with their values; None when they differ in none but
    ``trained_in`` (how_trained says that)."""
    if "cache_key" not in summary:
        return None
    stages = summary.drop_duplicates("cache_key")
    differ = [f"`{c}` ({', '.join(sorted(map(str, stages[c].dropna().unique())))})"
              for c in rounding_columns() if c != "trained_in" and c in stages
              and stages[c].dropna().nunique() > 1]
    if not differ:
        return None
    return ("Its stages were computed under settings that only reorder the floating-point "
            "arithmetic, which stage keys and settings leave out (kdrun/run/provenance.py "
            f"ROUNDING_ONLY): {', '.join(differ)}. Rows pooled across them agree to "
            "rounding, not bit for bit.")
