"""One report per sweep: every job's summary in one table, the gain per (T, alpha)
with its noise, the best setting chosen on validation accuracy, how soft the
teacher's targets were, a T x alpha heatmap and validation curves.

Written by a Hydra ``on_multirun_end`` callback at the end of ``kdrun -m ...`` and
by ``kdrun-report SWEEP_DIR`` for any sweep directory, finished or interrupted:
it reads the files jobs left behind (Hydra does not hand job results to callbacks).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

import pandas as pd
from hydra.experimental.callback import Callback

from kdrun.report import gain_interval, significance, write_summary
from kdrun.store import atomic_write

log = logging.getLogger("kdrun")
SETTING_KEYS = ("method", "T", "alpha")


class NoFinishedJobs(FileNotFoundError):
    pass


def job_dirs(sweep_dir: Path) -> tuple[list[Path], list[Path]]:
    """(started, finished) job directories: those with Hydra's record, those with a summary."""
    started = sorted(p.parent for p in sweep_dir.rglob(".hydra") if p.parent != sweep_dir)
    finished = sorted(p.parent for p in sweep_dir.rglob("summary.csv") if p.parent != sweep_dir)
    return started, finished


def collect(sweep_dir: Path, which: str) -> pd.DataFrame:
    """All finished jobs' summary.csv or metrics.csv, with a ``job`` column."""
    _, finished = job_dirs(sweep_dir)
    if not finished:
        raise NoFinishedJobs(f"no finished job (*/summary.csv) under {sweep_dir}: "
                             f"not a kdrun sweep directory, or no job has finished yet")
    frames = [pd.read_csv(d / which).assign(job=str(d.relative_to(sweep_dir))) for d in finished]
    return pd.concat(frames, ignore_index=True)


def setting_keys(summary: pd.DataFrame) -> list[str]:
    return [k for k in SETTING_KEYS if k in summary and summary[k].notna().any()]


def gains_by_setting(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per setting: distilled accuracy, paired gain over scratch, teacher accuracy."""
    keys = setting_keys(summary)
    pair = ["job", "seed"]
    scratch = summary[summary.role == "scratch"].set_index(pair).test_acc_best_val
    teacher = summary[summary.role == "teacher"].set_index("job").test_acc_best_val
    distilled = summary[summary.role == "distilled"].set_index(pair)
    distilled = distilled.assign(gain=distilled.test_acc_best_val - scratch).reset_index()
    distilled["teacher_acc"] = distilled.job.map(teacher)
    if "soft_target_entropy" not in distilled:
        distilled["soft_target_entropy"] = float("nan")
    rows = []
    for setting, group in distilled.groupby(keys, dropna=False, sort=True):
        gains = list(group.gain)
        lo, hi = gain_interval(gains) if len(gains) > 1 else (float("nan"),) * 2
        rows.append({
            **dict(zip(keys, setting if isinstance(setting, tuple) else (setting,))),
            "seeds": len(gains), "teacher_acc": group.teacher_acc.mean(),
            "val_acc": group.val_acc_best.mean(),
            "test_acc": group.test_acc_best_val.mean(), "test_std": _std(group.test_acc_best_val),
            "gain": statistics.mean(gains), "gain_std": _std(gains), "gain_ci_low": lo,
            "gain_ci_high": hi, "soft_target_entropy": group.soft_target_entropy.mean(),
            "verdict": significance(gains),
        })
    return pd.DataFrame(rows)


def _std(values) -> float:
    values = list(values)
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def write_report(sweep_dir: Path) -> Path:
    """summary.csv, report.md, gain_heatmap.png and curves.png in ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    summary = collect(sweep_dir, "summary.csv")
    write_summary(sweep_dir / "summary.csv", summary.to_dict("records"))
    table = gains_by_setting(summary)
    best = table.loc[table.val_acc.idxmax()]
    figures = [plot_gain_heatmap(table, sweep_dir / "gain_heatmap.png"),
               plot_curves(collect(sweep_dir, "metrics.csv"), best, sweep_dir / "curves.png")]
    started, finished = job_dirs(sweep_dir)
    text = _markdown(sweep_dir, table, best, len(started), len(finished),
                     [f.name for f in figures if f is not None])
    atomic_write(sweep_dir / "report.md", lambda tmp: tmp.write_text(text))
    return sweep_dir / "report.md"


def _markdown(sweep_dir, table, best, n_started, n_finished, figures) -> str:
    keys = setting_keys(table)
    shown = table.copy()
    shown["gain"] = [f"{g:+.2f} ± {s:.2f}" for g, s in zip(table.gain, table.gain_std)]
    shown["95% CI"] = [f"[{lo:+.2f}, {hi:+.2f}]" for lo, hi in
                       zip(table.gain_ci_low, table.gain_ci_high)]
    shown["distilled test acc"] = [f"{m:.2f} ± {s:.2f}" for m, s in
                                   zip(table.test_acc, table.test_std)]
    columns = keys + ["seeds", "teacher_acc", "val_acc", "distilled test acc", "gain", "95% CI",
                      "verdict"]
    best_name = " ".join(f"{k}={best[k]}" for k in keys)
    lines = [
        "# kdrun sweep report", "",
        f"Sweep `{sweep_dir}`: {n_finished} of {n_started} started jobs finished"
        + ("" if n_finished == n_started else " (interrupted: this report covers those)")
        + ".", "",
        "## Distillation gain per setting", "",
        "Accuracies in percent, test accuracy at the best-validation epoch. The gain is "
        "distilled minus scratch student of the same job and seed (same init, batch order, "
        "optimiser); ± is the std over seeds. A gain is *not significant* when it lies within "
        "one std of zero or its 95% Student-t interval includes zero.", "",
        markdown_table(shown[columns].round(2)), "",
        "## Best setting, selected on validation accuracy (never on test)", "",
        f"**{best_name}**: distilled validation accuracy {best.val_acc:.2f}, test accuracy "
        f"{best.test_acc:.2f}, gain {best.gain:+.2f} ({best.verdict}).", "",
    ]
    if "T" in keys and table.soft_target_entropy.notna().any():
        entropy = table.groupby("T").soft_target_entropy.mean().reset_index()
        gain = table.groupby("T").gain.mean().reset_index(drop=True)
        entropy["mean gain over alphas"] = gain.map(lambda g: f"{g:+.2f}")
        lines += ["## How soft the teacher's targets were", "",
                  "Mean entropy (nats) of softmax(teacher logits / T) over the training set; "
                  "0 is one-hot, ln(10) = 2.30 is uniform over 10 classes.", "",
                  markdown_table(entropy.round(3)), ""]
    lines += ["## Files", "", "- `summary.csv`: every job's summary rows"]
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


def plot_gain_heatmap(table: pd.DataFrame, path: Path) -> Path | None:
    """T x alpha grid of the mean gain, each cell annotated with mean ± std."""
    if not {"T", "alpha"} <= set(table.columns) or table[["T", "alpha"]].isna().any().any():
        return None
    plt = _pyplot()
    gain = table.pivot_table(index="T", columns="alpha", values="gain")
    std = table.pivot_table(index="T", columns="alpha", values="gain_std")
    verdict = table.pivot_table(index="T", columns="alpha", values="verdict", aggfunc="first")
    limit = max(float(gain.abs().max().max()), 1e-9)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * gain.shape[1], 1.2 + 0.8 * gain.shape[0]))
    image = ax.imshow(gain.values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    for i in range(gain.shape[0]):
        for j in range(gain.shape[1]):
            s = std.iloc[i, j] if not std.empty else float("nan")
            mark = "" if verdict.iloc[i, j] in ("helps", "hurts") else "\n(ns)"
            text = f"{gain.iloc[i, j]:+.2f}" + ("" if pd.isna(s) else f"\n±{s:.2f}") + mark
            dark = abs(gain.iloc[i, j]) > 0.6 * limit
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    ax.set_xticks(range(gain.shape[1]), [str(a) for a in gain.columns])
    ax.set_yticks(range(gain.shape[0]), [str(t) for t in gain.index])
    ax.set_xlabel("alpha (weight of the teacher term)")
    ax.set_ylabel("T")
    ax.set_title("distillation gain, test acc points (ns: not significant)", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(metrics: pd.DataFrame, best: pd.Series, path: Path) -> Path:
    """Validation accuracy per epoch: teacher, scratch, and the best distilled setting."""
    plt = _pyplot()
    val = metrics[metrics.split == "val"]
    chosen = val.stage == "distilled"
    for key in setting_keys(val):
        chosen &= val[key].astype(str) == str(best[key])
    curves = {"teacher": val[val.stage == "teacher"], "scratch": val[val.stage == "scratch"],
              "distilled (best setting)": val[chosen]}
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


def main(argv: list[str] | None = None) -> int:
    """kdrun-report SWEEP_DIR: (re)write the report of a sweep, finished or not."""
    parser = argparse.ArgumentParser(prog="kdrun-report", description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        report = write_report(args.sweep_dir)
    except NoFinishedJobs as e:
        print(f"kdrun-report: error: {e}", file=sys.stderr)
        return 2
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
