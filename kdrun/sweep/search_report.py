"""The student search's part of a sweep report (kdrun/sweep/pareto.py computes it):
pareto.csv, pareto.png and a section of report.md."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from kdrun.report.table import markdown_table
from kdrun.store.files import atomic_write
from kdrun.sweep.jobs import Jobs
from kdrun.sweep.pareto import COSTS, KINDS, candidates, mark_fronts, rank_correlation
from kdrun.sweep.plots import _pyplot, save_figure

DEFAULT_TOLERANCE = 1.0  # configs/config.yaml: search.tolerance


def tolerance_of(jobs: Jobs) -> float:
    """``search.tolerance`` of the sweep's jobs (their first finished one's config)."""
    path = next(iter(jobs.settings)) / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(path) if path.exists() else OmegaConf.create()
    return float(OmegaConf.select(cfg, "search.tolerance", default=DEFAULT_TOLERANCE))


def search_section(summary: pd.DataFrame, jobs: Jobs, folder: Path) -> tuple[list[str], list[Path]]:
    """report.md's student-search section, with pareto.csv and pareto.png in ``folder``."""
    keys = [k for k in jobs.swept if k.startswith("student.")]
    tolerance = tolerance_of(jobs)
    teacher = summary[summary.role == "teacher"].test_metric_best_val.mean()
    table = mark_fronts(candidates(summary, keys), teacher, tolerance)
    atomic_write(folder / "pareto.csv", lambda tmp: table.to_csv(tmp, index=False))
    figure = plot_pareto(table, teacher, folder / "pareto.png")
    shown = table.sort_values("params")[[*keys, "params", "latency_ms_b1", "scratch_test",
                                          "distilled_test", "scratch_front_params",
                                          "distilled_front_params",
                                          "distilled_front_latency_ms_b1"]].round(3)
    lines = ["## Student search", "",
             f"{len(table)} candidate students, each trained from scratch and distilled from "
             f"one teacher (test accuracy {teacher:.2f}); mean over the student seeds. "
             f"A front holds the candidates no other beats on validation accuracy at a cost "
             f"as low (test accuracy never selects).", "", markdown_table(shown), "",
             *[f"- {line}" for line in _marked(table, tolerance)],
             f"- {rank_correlation(table)}", ""]
    return lines, [folder / "pareto.csv", figure]


def _marked(table: pd.DataFrame, tolerance: float) -> list[str]:
    lines = []
    for kind in KINDS:
        for cost, words in COSTS.items():
            front = table[table[f"{kind}_front_{cost}"]].sort_values(cost)
            knee = table[table[f"{kind}_knee_{cost}"]]
            lines.append(f"{kind}, accuracy against {words}: front "
                         f"{', '.join(front.arch)}; knee "
                         f"{knee.arch.iloc[0] if len(knee) else 'none (under 3 points)'}")
        close = table[table[f"{kind}_smallest_close"]]
        lines.append(f"{kind}: the smallest student at most {tolerance:g} point(s) below the "
                     f"teacher: {close.arch.iloc[0] if len(close) else 'none'}")
    return lines


def plot_pareto(table: pd.DataFrame, teacher: float, path: Path) -> Path:
    """Accuracy against parameters and against latency: every candidate, scratch and
    distilled, their fronts joined, the knees starred, the smallest student within the
    tolerance ringed, the teacher as a dashed line."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(COSTS), figsize=(5.2 * len(COSTS), 4), squeeze=False)
    colors = {"scratch": "tab:gray", "distilled": "tab:blue"}
    for ax, (cost, words) in zip(axes[0], COSTS.items()):
        for kind in KINDS:
            ax.scatter(table[cost], table[f"{kind}_test"], color=colors[kind], s=18,
                       label=kind, alpha=0.7)
            front = table[table[f"{kind}_front_{cost}"]].sort_values(cost)
            ax.step(front[cost], front[f"{kind}_test"], where="post", color=colors[kind])
            knee = table[table[f"{kind}_knee_{cost}"]]
            ax.scatter(knee[cost], knee[f"{kind}_test"], marker="*", s=160,
                       color=colors[kind], edgecolor="black", zorder=3)
            close = table[table[f"{kind}_smallest_close"]]
            ax.scatter(close[cost], close[f"{kind}_test"], s=220, facecolor="none",
                       edgecolor=colors[kind], linewidth=1.5, zorder=3)
        ax.axhline(teacher, linestyle="--", color="black", linewidth=0.8, label="teacher")
        ax.set_xscale("log")
        ax.set_xlabel(words)
        ax.set_ylabel("test accuracy (%), best-val epoch")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("student search: fronts chosen on validation (lines), knees (*), smallest "
                 "within tolerance (o)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    return path
