"""One report per sweep: every job's summary in one table, the gain per setting with
its noise, the best setting chosen on validation accuracy, how soft the teacher's
targets were, T x alpha heatmaps and validation curves.

A *setting* is what a job's overrides say, less its replicate keys (``seed``), the
keys that cannot change results and those that only reorder the arithmetic
(kdrun/run/provenance.py: NO_EFFECT, ROUNDING_ONLY): only jobs of one setting are pooled,
the report says when their rows were computed in other orders, and every swept key is
a column of its own. Students are nested in teachers:
with several teacher seeds in a setting, the interval is taken over the teachers'
mean gains, with the spread within each teacher beside it.

Written by a Hydra ``on_multirun_end`` callback at the end of ``kdrun -m ...`` and
by ``kdrun-report SWEEP_DIR`` for any sweep directory, finished or interrupted:
it reads the files jobs left behind (Hydra does not hand job results to callbacks).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from kdrun.data.metrics import ACCURACY, Metric
from kdrun.report.table import (
    format_p,
    gain_test,
    markdown_table,
    summary_metric,
    write_summary,
)
from kdrun.run.provenance import REPLICATE_KEYS, outside_the_key, rounding_columns
from kdrun.store.files import atomic_write
from kdrun.sweep.plots import plot_curves, plot_gains, setting_name, short_value

log = logging.getLogger("kdrun")
# Summary columns that must match for jobs to be pooled, swept or not.
CONDITION_KEYS = ("device", "precision", "torch", "data_sha256")


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
    column per swept key."""
    frames = [pd.read_csv(d / which).assign(job=str(d.relative_to(jobs.root)),
                                            **{k: setting.get(k, "-") for k in jobs.swept})
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


def gains_by_setting(summary: pd.DataFrame, swept: list[str]) -> pd.DataFrame:
    """One row per setting: the distilled students' metric, their paired gain over
    scratch (tested over student seeds under one teacher, or over teachers' mean gains
    under several, helping or hurting as the metric's direction says), the teacher's."""
    metric = summary_metric(summary)
    keys = swept + unexplained_conditions(summary, swept)
    pair = ["job", "seed"]
    scratch = summary[summary.role == "scratch"].set_index(pair).test_acc_best_val
    teachers = summary[summary.role == "teacher"].set_index("job")
    distilled = summary[summary.role == "distilled"].set_index(pair)
    distilled = distilled.assign(gain=distilled.test_acc_best_val - scratch).reset_index()
    distilled["teacher_acc"] = distilled.job.map(teachers.test_acc_best_val)
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
        "teacher_acc": group.drop_duplicates("teacher").teacher_acc.mean(),
        "val_acc": group.val_acc_best.mean(),
        "test_acc": group.test_acc_best_val.mean(), "test_std": _std(group.test_acc_best_val),
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


def write_report(sweep_dir: Path, published: Path | None = None) -> Path:
    """summary.csv, report.md, the gain figure and curves.png in ``sweep_dir``; with
    ``published`` (a CSV like kdrun/sweep/published.csv), report.md ends with the sweep's
    results beside those figures (kdrun/sweep/published.py)."""
    return _write_report(sweep_dir, published)[0]


def _write_report(sweep_dir: Path, published: Path | None = None) -> tuple[Path, list[str]]:
    """write_report's files, and the report's lines for the console (console_lines)."""
    sweep_dir = Path(sweep_dir)
    jobs = read_jobs(sweep_dir)
    summary = collect(jobs, "summary.csv")
    metrics = collect(jobs, "metrics.csv")
    write_summary(sweep_dir / "summary.csv", summary.to_dict("records"))
    table = gains_by_setting(summary, jobs.swept)
    keys = setting_keys(table, jobs.swept)
    metric = summary_metric(summary)
    best = best_setting(table, metric)
    figures = [*plot_gains(table, keys, sweep_dir, metric),
               plot_curves(metrics, best, keys, sweep_dir / "curves.png", metric)]
    text = _markdown(sweep_dir, table, jobs.swept, best, len(jobs.started),
                     len(jobs.settings), jobs.common, [f.name for f in figures],
                     failed_jobs(sweep_dir), how_trained(summary), other_orders(summary),
                     metric)
    if published is not None:
        from kdrun.sweep.published import published_section

        text += "\n" + "\n".join(published_section(summary, metrics, Path(published)))
    atomic_write(sweep_dir / "report.md", lambda tmp: tmp.write_text(text))
    return sweep_dir / "report.md", console_lines(table, keys)


def setting_keys(table: pd.DataFrame, swept: list[str]) -> list[str]:
    """The columns of a gains_by_setting table that name its settings: the swept keys,
    then any condition that keeps settings apart."""
    return [k for k in table.columns if k in swept or k in CONDITION_KEYS]


def best_setting(table: pd.DataFrame, metric: Metric) -> pd.Series | None:
    """The setting whose distilled students score best on *validation*; None without a
    validation split."""
    if not table.val_acc.notna().any():
        return None
    return table.loc[table.val_acc.idxmax() if metric.higher_is_better else table.val_acc.idxmin()]


def console_lines(table: pd.DataFrame, keys: list[str]) -> list[str]:
    """The report in a few lines for the console: one per setting (named by ``keys``), its
    distilled test metric and gain with interval and verdict."""
    lines = []
    for _, row in table.iterrows():
        setting = setting_name(keys, tuple(row[k] for k in keys), " ") or "all jobs"
        interval = ("" if math.isnan(row.gain_ci_low)
                    else f" [{row.gain_ci_low:+.2f}, {row.gain_ci_high:+.2f}]")
        lines.append(f"  {setting}: distilled {row.test_acc:.2f}, gain {row.gain:+.2f}"
                     f"{interval} over {row.interval_over}: {row.verdict}")
    return lines


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


def _markdown(sweep_dir, table, swept, best, n_started, n_finished, common, figures,
              failed: dict[str, str], trained: str | None = None,
              orders: str | None = None, metric: Metric = ACCURACY) -> str:
    keys = setting_keys(table, swept) if swept else ["method", "T", "alpha"]
    shown = table.copy()
    for key in keys:  # split.labeled=100, not 100.0
        shown[key] = [short_value(v) for v in shown[key]]
    shown["gain"] = [f"{g:+.2f} ± {s:.2f}" for g, s in zip(table.gain, table.gain_std)]
    shown["95% CI"] = [f"[{lo:+.2f}, {hi:+.2f}]" for lo, hi in
                       zip(table.gain_ci_low, table.gain_ci_high)]
    shown["p"] = [format_p(p) if not math.isnan(p) else "-" for p in table.p]
    shown["distilled test acc"] = [f"{m:.2f} ± {s:.2f}" for m, s in
                                   zip(table.test_acc, table.test_std)]
    counts = ["labelled", "unlabelled"] if "unlabelled" in table and \
        (table.unlabelled > 0).any() else []
    columns = keys + counts + ["teachers", "students", "teacher_acc", "val_acc",
                               "distilled test acc",
                      "gain", "within_teacher_std", "95% CI", "p", "interval_over", "verdict"]
    lines = [
        "# kdrun sweep report", "",
        f"Sweep `{sweep_dir}`: {n_finished} of {n_started} started jobs finished"
        + (f", {len(failed)} failed (listed below)" if failed else "")
        + ("" if n_finished + len(failed) == n_started else
           " (interrupted: this report covers those finished)") + ".", "",
    ]
    if common:
        lines += ["Common to every finished job: "
                  + ", ".join(f"`{k}={v}`" for k, v in common.items()) + ".", ""]
    lines += [f"{note}\n" for note in (trained, orders) if note]
    lines += [
        "## Distillation gain per setting", "",
        f"{metric.name.capitalize()} in {metric.unit}, test {metric.name} at the best-validation "
        "epoch. A setting is a "
        "job's overrides less its seed and the settings that cannot change results or only "
        "reorder the arithmetic; only jobs of one setting are pooled. The gain is distilled "
        "minus scratch student of the same job and seed (same init, batch order, optimiser). "
        "With one teacher, the 95% Student-t interval and the paired t-test's p are over "
        "student seeds and hold for that teacher; with several teacher seeds, over the "
        "teachers' mean gains (students are nested in teachers), `within_teacher_std` being "
        "the spread of student seeds under one teacher. ± is the std of what the interval is "
        "over. *helps* / *hurts*: p < 0.05.", "",
        markdown_table(shown[columns].round(2)), "",
    ]
    lines += [f"## Best setting, selected on validation {metric.name} (never on test)", ""]
    if best is None:
        lines += ["No validation accuracy for the distilled students (no validation split, "
                  "`split.val_fraction=0`, or data-free students, which read no validation "
                  "example): no setting is selected.", ""]
    else:
        best_name = setting_name(keys, tuple(best[k] for k in keys), " ")
        lines += [f"**{best_name}**: distilled validation {metric.name} {best.val_acc:.2f}, "
                  f"test {metric.name} {best.test_acc:.2f}, gain {best.gain:+.2f} "
                  f"({best.verdict}).", ""]
    if table["T"].notna().any() and table.soft_target_entropy.notna().any():
        entropy = table.groupby("T").soft_target_entropy.mean().reset_index()
        gain = table.groupby("T").gain.mean().reset_index(drop=True)
        entropy["mean gain over settings"] = gain.map(lambda g: f"{g:+.2f}")
        lines += ["## How soft the teacher's targets were", "",
                  "Mean entropy (nats) of softmax(teacher logits / T) over the training set; "
                  "0 is one-hot, ln(10) = 2.30 is uniform over 10 classes.", "",
                  markdown_table(entropy.round(3)), ""]
    if failed:
        lines += ["## Failed jobs", "", "| job | error |", "|---|---|"]
        lines += [f"| `{job}` | {error.replace('|', '/')} |" for job, error in failed.items()]
        lines += [""]
    lines += ["## Files", "", "- `summary.csv`: every job's summary rows, one column per "
              "swept key"]
    lines += [f"- `{name}`" for name in figures]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- entry points


class SweepReport(Callback):
    """Hydra callback: write the sweep report when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            report, lines = _write_report(sweep_dir)
            log.info("sweep report: %s\n%s", report, "\n".join(lines))
        except NoFinishedJobs as e:
            log.warning("no sweep report: %s", e)
        if config.logger.name == "mlflow":
            from kdrun.report.mlflow_log import log_sweep_report

            log_sweep_report(config, sweep_dir, sorted(sweep_dir.glob("*.csv")) +
                             sorted(sweep_dir.glob("*.md")) + sorted(sweep_dir.glob("*.png")))
        failed = failed_jobs(sweep_dir)
        if failed:  # the sweep ran every job; it still did not succeed
            job, error = next(iter(failed.items()))
            print(f"kdrun: error: {len(failed)} job(s) of the sweep failed, first {job}: "
                  f"{error}", file=sys.stderr)
            sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    """kdrun-report SWEEP_DIR: (re)write the report of a sweep, finished or not."""
    from kdrun.errors import UserError
    from kdrun.sweep.published import PUBLISHED_CSV

    parser = argparse.ArgumentParser(prog="kdrun-report", description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--published", type=Path, nargs="?", const=PUBLISHED_CSV,
                        help="also put the results beside published ones (default: "
                             "kdrun/published.csv, shipped with kdrun: the CIFAR-100 benchmark)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.sweep_dir, args.published)
    except (NoFinishedJobs, UserError) as e:
        print(f"kdrun-report: error: {e}", file=sys.stderr)
        return 2
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
