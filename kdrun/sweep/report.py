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
by ``kdrun-report SWEEP_DIR`` for any sweep directory, finished or interrupted, in three
steps: read the jobs' files (kdrun/sweep/jobs.py), analyse them into a record
(kdrun/sweep/analysis.py), render it (here: report.md and the console's lines; the
figures: kdrun/sweep/plots.py).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import pandas as pd
from hydra.experimental.callback import Callback

from kdrun.errors import StorageFault
from kdrun.report.statistics import format_p
from kdrun.report.table import markdown_table, write_summary
from kdrun.store.files import atomic_write
from kdrun.sweep.analysis import SweepAnalysis, analyse
from kdrun.sweep.jobs import NoFinishedJobs, collect, failed_jobs, read_jobs
from kdrun.sweep.pareto import is_student_search
from kdrun.sweep.plots import plot_curves, plot_gains, setting_name, short_value
from kdrun.sweep.search_report import search_section

log = logging.getLogger("kdrun")


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
    if not (summary.role == "distilled").any():  # e.g. scheme=lifelong: no gain to pool
        return _jobs_only_report(sweep_dir, jobs)
    found = analyse(jobs, summary)
    figures = [*plot_gains(found.table, found.keys, sweep_dir, found.metric),
               plot_curves(metrics, found.best, found.keys, sweep_dir / "curves.png",
                           found.metric)]
    search = []
    if is_student_search(jobs.swept):  # candidate students: their Pareto fronts
        search, files = search_section(summary, jobs, sweep_dir)
        figures += files
    text = markdown(found, [f.name for f in figures], search)
    if published is not None:
        from kdrun.sweep.published import published_section

        text += "\n" + "\n".join(published_section(summary, metrics, Path(published)))
    atomic_write(sweep_dir / "report.md", lambda tmp: tmp.write_text(text))
    return sweep_dir / "report.md", console_lines(found.table, found.keys)


def _jobs_only_report(sweep_dir: Path, jobs) -> tuple[Path, list[str]]:
    """report.md of a sweep whose scheme makes no scratch and distilled rows to pair (e.g.
    scheme=lifelong): its jobs, each with its own table in its kdrun.log."""
    names = [str(d.relative_to(sweep_dir)) for d in jobs.settings]
    lines = ["# kdrun sweep report", "",
             f"Sweep `{sweep_dir}`: {len(names)} of {len(jobs.started)} started jobs finished. "
             "Their scheme makes no scratch and distilled students to pair, so no gain is "
             "pooled here: each job's table is in its `kdrun.log`, its rows in `summary.csv`.",
             "", *[f"- `{name}`" for name in names], ""]
    atomic_write(sweep_dir / "report.md", lambda tmp: tmp.write_text("\n".join(lines)))
    return sweep_dir / "report.md", [f"  {name}: see its kdrun.log" for name in names]


def console_lines(table: pd.DataFrame, keys: list[str]) -> list[str]:
    """The report in a few lines for the console: one per setting (named by ``keys``), its
    distilled test metric and gain with interval and verdict."""
    lines = []
    for _, row in table.iterrows():
        setting = setting_name(keys, tuple(row[k] for k in keys), " ") or "all jobs"
        interval = ("" if math.isnan(row.gain_ci_low)
                    else f" [{row.gain_ci_low:+.2f}, {row.gain_ci_high:+.2f}]")
        lines.append(f"  {setting}: distilled {row.test_metric:.2f}, gain {row.gain:+.2f}"
                     f"{interval} over {row.interval_over}: {row.verdict}")
    return lines


# ---------------------------------------------------------------- report.md


def markdown(found: SweepAnalysis, figures: list[str], search: list[str] = ()) -> str:
    """report.md: its sections in order (``search``: a student search's, search_report.py)."""
    keys = found.keys if found.swept else ["method", "T", "alpha"]
    lines = [*_header(found), *_gain_section(found, keys), *_best_section(found, keys),
             *search, *_entropy_section(found.table), *_failed_section(found.failed),
             "## Files", "",
             "- `summary.csv`: every job's summary rows, one column per swept key",
             *[f"- `{name}`" for name in figures]]
    return "\n".join(lines) + "\n"


def _header(found: SweepAnalysis) -> list[str]:
    failed, started, finished = found.failed, found.started, found.finished
    lines = [
        "# kdrun sweep report", "",
        f"Sweep `{found.sweep_dir}`: {finished} of {started} started jobs finished"
        + (f", {len(failed)} failed (listed below)" if failed else "")
        + ("" if finished + len(failed) == started else
           " (interrupted: this report covers those finished)") + ".", "",
    ]
    if found.common:
        lines += ["Common to every finished job: "
                  + ", ".join(f"`{k}={v}`" for k, v in found.common.items()) + ".", ""]
    return lines + [f"{note}\n" for note in (found.trained, found.orders) if note]


def _gain_section(found: SweepAnalysis, keys: list[str]) -> list[str]:
    table, metric = found.table, found.metric
    shown = table.copy()
    for key in keys:  # split.labeled=100, not 100.0
        shown[key] = [short_value(v) for v in shown[key]]
    shown["gain"] = [f"{g:+.2f} ± {s:.2f}" for g, s in zip(table.gain, table.gain_std)]
    shown["95% CI"] = [f"[{lo:+.2f}, {hi:+.2f}]" for lo, hi in
                       zip(table.gain_ci_low, table.gain_ci_high)]
    shown["p"] = [format_p(p) if not math.isnan(p) else "-" for p in table.p]
    distilled = f"distilled test {metric.short}"  # acc, or ppl
    shown[distilled] = [f"{m:.2f} ± {s:.2f}" for m, s in zip(table.test_metric, table.test_std)]
    counts = ["labelled", "unlabelled"] if "unlabelled" in table and \
        (table.unlabelled > 0).any() else []
    columns = keys + counts + ["teachers", "students", "teacher_metric", "val_metric",
                               distilled, "gain", "within_teacher_std", "95% CI",
                               "p", "interval_over", "verdict"]
    return [
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


def _best_section(found: SweepAnalysis, keys: list[str]) -> list[str]:
    best, metric = found.best, found.metric
    lines = [f"## Best setting, selected on validation {metric.name} (never on test)", ""]
    if best is None:
        return lines + ["No validation accuracy for the distilled students (no validation "
                        "split, `split.val_fraction=0`, or data-free students, which read no "
                        "validation example): no setting is selected.", ""]
    best_name = setting_name(keys, tuple(best[k] for k in keys), " ")
    return lines + [f"**{best_name}**: distilled validation {metric.name} {best.val_metric:.2f}, "
                    f"test {metric.name} {best.test_metric:.2f}, gain {best.gain:+.2f} "
                    f"({best.verdict}).", ""]


def _entropy_section(table: pd.DataFrame) -> list[str]:
    if not (table["T"].notna().any() and table.soft_target_entropy.notna().any()):
        return []
    entropy = table.groupby("T").soft_target_entropy.mean().reset_index()
    gain = table.groupby("T").gain.mean().reset_index(drop=True)
    entropy["mean gain over settings"] = gain.map(lambda g: f"{g:+.2f}")
    return ["## How soft the teacher's targets were", "",
            "Mean entropy (nats) of softmax(teacher logits / T) over the training set; "
            "0 is one-hot, ln(10) = 2.30 is uniform over 10 classes.", "",
            markdown_table(entropy.round(3)), ""]


def _failed_section(failed: dict[str, str]) -> list[str]:
    if not failed:
        return []
    return ["## Failed jobs", "", "| job | error |", "|---|---|",
            *[f"| `{job}` | {error.replace('|', '/')} |" for job, error in failed.items()], ""]


# ---------------------------------------------------------------- entry points


class SweepReport(Callback):
    """Hydra callback: write the sweep report when a multirun ends. Its status (0, or 1
    when a job failed) is ``SweepReport.status``, which kdrun's entry point exits with."""

    status = 0

    def on_multirun_end(self, config, **kwargs) -> int:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            report, lines = _write_report(sweep_dir)
            log.info("sweep report: %s\n%s", report, "\n".join(lines))
        except NoFinishedJobs as e:
            log.warning("no sweep report: %s", e)
        except StorageFault as e:  # the jobs' own files are kept; kdrun-report writes it later
            print(f"kdrun: error: no sweep report: {e}; kdrun-report {sweep_dir} writes it "
                  f"once there is room", file=sys.stderr)
            SweepReport.status = 1
            return SweepReport.status
        if config.logger.name == "mlflow":
            from kdrun.report.mlflow_log import log_sweep_report

            log_sweep_report(config, sweep_dir, sorted(sweep_dir.glob("*.csv")) +
                             sorted(sweep_dir.glob("*.md")) + sorted(sweep_dir.glob("*.png")))
        failed = failed_jobs(sweep_dir)
        if failed:  # the sweep ran every job; it still did not succeed
            job, error = next(iter(failed.items()))
            print(f"kdrun: error: {len(failed)} job(s) of the sweep failed, first {job}: "
                  f"{error}", file=sys.stderr)
        SweepReport.status = 1 if failed else 0
        return SweepReport.status


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
