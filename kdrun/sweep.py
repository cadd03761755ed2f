"""One report per sweep: every job's summary in one table, the gain per setting with
its noise, the best setting chosen on validation accuracy, how soft the teacher's
targets were, T x alpha heatmaps and validation curves.

A *setting* is what a job's overrides say, less its replicate keys (``seed``), the
keys that cannot change results and those that only reorder the arithmetic
(kdrun/provenance.py: NO_EFFECT, ROUNDING_ONLY): only jobs of one setting are pooled,
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

from kdrun.provenance import REPLICATE_KEYS, outside_the_key, rounding_columns
from kdrun.report import format_p, gain_test, write_summary
from kdrun.store import atomic_write

log = logging.getLogger("kdrun")
# Summary columns that must match for jobs to be pooled, swept or not.
CONDITION_KEYS = ("device", "precision", "torch", "data_sha256")
HEATMAP_AXES = ("loss.T", "loss.alpha")  # swept keys that are the heatmap's own axes
# swept keys that set how much data has labels: the report plots the gain against them
BUDGET_AXES = ("split.labeled", "dataset.unlabeled")


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
    return pd.concat(frames, ignore_index=True)


def gains_by_setting(summary: pd.DataFrame, swept: list[str]) -> pd.DataFrame:
    """One row per setting: distilled accuracy, paired gain over scratch (tested over
    student seeds under one teacher, or over teachers' mean gains under several),
    teacher accuracy."""
    conditions = [c for c in CONDITION_KEYS if c in summary and summary[c].nunique() > 1]
    keys = swept + conditions
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
        rows.append({**dict(zip(keys, setting)), **_setting_row(group)})
    return pd.DataFrame(rows)


def _setting_row(group: pd.DataFrame) -> dict:
    per_teacher = group.groupby("teacher", sort=False).gain
    means = list(per_teacher.mean())
    nested = len(means) > 1
    test = gain_test(means if nested else list(group.gain))
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
    """summary.csv, report.md, gain_heatmap.png and curves.png in ``sweep_dir``; with
    ``published`` (a CSV like kdrun/published.csv), report.md ends with the sweep's
    results beside those figures (kdrun/published.py)."""
    sweep_dir = Path(sweep_dir)
    jobs = read_jobs(sweep_dir)
    summary = collect(jobs, "summary.csv")
    metrics = collect(jobs, "metrics.csv")
    write_summary(sweep_dir / "summary.csv", summary.to_dict("records"))
    table = gains_by_setting(summary, jobs.swept)
    best = table.loc[table.val_acc.idxmax()] if table.val_acc.notna().any() else None
    figures = [plot_gain_heatmaps(table, jobs.swept, sweep_dir / "gain_heatmap.png"),
               plot_gain_against_budget(table, jobs.swept, sweep_dir / "gain_vs_labels.png"),
               plot_curves(metrics, best, sweep_dir / "curves.png")]
    text = _markdown(sweep_dir, table, jobs.swept, best, len(jobs.started),
                     len(jobs.settings), jobs.common,
                     [f.name for f in figures if f is not None], failed_jobs(sweep_dir),
                     how_trained(summary), other_orders(summary))
    if published is not None:
        from kdrun.published import published_section

        text += "\n" + "\n".join(published_section(summary, metrics, Path(published)))
    atomic_write(sweep_dir / "report.md", lambda tmp: tmp.write_text(text))
    return sweep_dir / "report.md"


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
            "arithmetic, which stage keys and settings leave out (kdrun/provenance.py "
            f"ROUNDING_ONLY): {', '.join(differ)}. Rows pooled across them agree to "
            "rounding, not bit for bit.")


def _markdown(sweep_dir, table, swept, best, n_started, n_finished, common, figures,
              failed: dict[str, str], trained: str | None = None,
              orders: str | None = None) -> str:
    keys = [k for k in table.columns if k in swept or k in CONDITION_KEYS]
    if not swept:
        keys = ["method", "T", "alpha"]
    shown = table.copy()
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
        "Accuracies in percent, test accuracy at the best-validation epoch. A setting is a "
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
    lines += ["## Best setting, selected on validation accuracy (never on test)", ""]
    if best is None:
        lines += ["No validation split (`split.val_fraction=0`): no setting is selected.", ""]
    else:
        best_name = " ".join(f"{k}={best[k]}" for k in keys)
        lines += [f"**{best_name}**: distilled validation accuracy {best.val_acc:.2f}, test "
                  f"accuracy {best.test_acc:.2f}, gain {best.gain:+.2f} ({best.verdict}).", ""]
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


def markdown_table(df: pd.DataFrame) -> str:
    cells = df.astype(object).where(df.notna(), "-").astype(str)  # a key a method lacks: "-"
    rows = [list(df.columns), ["---"] * len(df.columns)] + cells.values.tolist()
    return "\n".join("| " + " | ".join(map(str, r)) + " |" for r in rows)


# ---------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_gain_heatmaps(table: pd.DataFrame, swept: list[str], path: Path) -> Path | None:
    """One T x alpha panel of the mean gain for each combination of the other swept keys
    (each panel titled by it), each cell annotated with mean ± std."""
    others = [k for k in table.columns if (k in swept and k not in HEATMAP_AXES)
              or k in CONDITION_KEYS]
    panels = list(table.groupby(others, dropna=False, sort=True)) if others else [((), table)]
    panels = [(name, t) for name, t in panels
              if t[["T", "alpha"]].notna().all().all() and not t.duplicated(["T", "alpha"]).any()]
    if not panels:
        return None
    plt = _pyplot()
    limit = max(float(table.gain.abs().max()), 1e-9)
    n_t, n_a = table["T"].nunique(), table.alpha.nunique()
    fig, axes = plt.subplots(1, len(panels), squeeze=False,
                             figsize=(max(3.4, 1.6 + 1.3 * n_a) * len(panels), 1.8 + 0.8 * n_t))
    for i, (ax, (name, panel)) in enumerate(zip(axes[0], panels)):
        name = name if isinstance(name, tuple) else (name,)
        title = ", ".join(f"{k}={v}" for k, v in zip(others, name)) or "all jobs"
        image = _heatmap_panel(ax, panel, limit, title)
        ax.set_ylabel("T" if i == 0 else "")
    fig.colorbar(image, ax=list(axes[0]))
    fig.suptitle("distillation gain, test acc points (ns: not significant)", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_gain_against_budget(table: pd.DataFrame, swept: list[str], path: Path) -> Path | None:
    """The gain with its 95% interval against each swept label-budget key (split.labeled,
    dataset.unlabeled), one line per combination of the other swept keys."""
    axes_keys = [k for k in BUDGET_AXES if k in swept]
    if not axes_keys:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(axes_keys), squeeze=False, figsize=(5 * len(axes_keys), 3.6))
    for ax, key in zip(axes[0], axes_keys):
        others = [k for k in swept if k != key]
        lines = table.groupby(others, dropna=False, sort=True) if others else [((), table)]
        for name, line in lines:
            line = line.assign(x=pd.to_numeric(line[key], errors="coerce")).sort_values("x")
            name = name if isinstance(name, tuple) else (name,)
            label = ", ".join(f"{k}={v}" for k, v in zip(others, name)) or None
            errors = [line.gain - line.gain_ci_low, line.gain_ci_high - line.gain]
            ax.errorbar(line.x, line.gain, yerr=errors, marker="o", capsize=3, label=label)
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set_xlabel(key)
        ax.set_ylabel("gain, test acc points (95% CI)")
        if others:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("distillation gain against the label budget", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _heatmap_panel(ax, table: pd.DataFrame, limit: float, title: str):
    gain = table.pivot(index="T", columns="alpha", values="gain")
    std = table.pivot(index="T", columns="alpha", values="gain_std")
    verdict = table.pivot(index="T", columns="alpha", values="verdict")
    image = ax.imshow(gain.values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    for i in range(gain.shape[0]):
        for j in range(gain.shape[1]):
            if pd.isna(gain.iloc[i, j]):
                continue
            s = std.iloc[i, j]
            mark = "" if verdict.iloc[i, j] in ("helps", "hurts") else "\n(ns)"
            text = f"{gain.iloc[i, j]:+.2f}" + ("" if pd.isna(s) else f"\n±{s:.2f}") + mark
            dark = abs(gain.iloc[i, j]) > 0.6 * limit
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    ax.set_xticks(range(gain.shape[1]), [str(a) for a in gain.columns])
    ax.set_yticks(range(gain.shape[0]), [str(t) for t in gain.index])
    ax.set_xlabel("alpha (teacher-term weight)")
    ax.set_title(title, fontsize=8)
    return image


def plot_curves(metrics: pd.DataFrame, best: pd.Series | None, path: Path) -> Path:
    """Validation accuracy per epoch: teacher, scratch, and the best distilled setting
    (the jobs of that setting; all jobs when there is no validation split to choose by)."""
    plt = _pyplot()
    val = metrics[metrics.split == "val"]
    jobs = set(best["jobs"]) if best is not None else set(val.job)
    chosen = val[val.job.isin(jobs)]
    curves = {"teacher": chosen[chosen.stage == "teacher"],
              "scratch": chosen[chosen.stage == "scratch"],
              "distilled (best setting)": chosen[chosen.stage == "distilled"]}
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in curves.items():
        mean = rows.groupby("epoch").acc.mean()
        ax.plot(mean.index, mean.values, label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("validation accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- entry points


class SweepReport(Callback):
    """Hydra callback: write the sweep report when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            log.info("sweep report: %s", write_report(sweep_dir))
        except NoFinishedJobs as e:
            log.warning("no sweep report: %s", e)
        if config.logger.name == "mlflow":
            from kdrun.mlflow_log import log_sweep_report

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
    from kdrun.published import PUBLISHED_CSV

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
