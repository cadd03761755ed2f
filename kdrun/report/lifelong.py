"""A lifelong run's report (scheme=lifelong): per learner, the accuracy on every task after
each task learnt (the accuracy matrix R, R[i, j] the test accuracy on task j once task i
is learnt), its summary figures, and the verdict on LwF against fine-tuning.

- average accuracy ACC = mean_j R[T, j], after the last task T (Lopez-Paz & Ranzato 2017,
  "Gradient Episodic Memory for Continual Learning", NeurIPS);
- backward transfer BWT = mean_{j<T} (R[T, j] - R[j, j]): below 0 is forgetting (same paper);
- forgetting F = mean_{j<T} (max_{l<T} R[l, j] - R[T, j]) (Chaudhry et al. 2018, "Riemannian
  Walk for Incremental Learning", ECCV): the drop from the best it ever was.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pandas as pd

from kdrun.report.statistics import format_p, gain_test
from kdrun.report.table import mean_std
from kdrun.store.files import atomic_write

METHODS = ("finetune", "lwf", "joint")  # the learners, in the table's order
NAMES = {"finetune": "fine-tune", "lwf": "LwF", "joint": "joint (upper bound)"}


def average_accuracy(R: np.ndarray) -> float:
    return float(np.mean(R[-1]))


def backward_transfer(R: np.ndarray) -> float:
    last = len(R) - 1
    return float(np.mean([R[last, j] - R[j, j] for j in range(last)]))


def forgetting(R: np.ndarray) -> float:
    last = len(R) - 1
    return float(np.mean([R[j:last, j].max() - R[last, j] for j in range(last)]))


def accuracy_matrix(summary: pd.DataFrame, method: str, seed: int) -> np.ndarray:
    """R of one learner and seed: row i after task i + 1, NaN above the diagonal; the first
    task's row is every learner's."""
    rows = summary[(summary.seed == seed) & summary.learner.isin([method, "all"])]
    tasks = int(summary.task.max())
    R = np.full((tasks, tasks), np.nan)
    for _, row in rows.iterrows():
        i = int(row.task) - 1
        R[i, :i + 1] = [row[f"acc_task{j + 1}"] for j in range(i + 1)]
    return R


def figures(summary: pd.DataFrame) -> dict[str, dict[str, list[float]]]:
    """Per learner, ACC, BWT and forgetting of each seed, in seed order."""
    seeds = sorted(summary.seed.unique())
    out = {}
    for method in METHODS:
        matrices = [accuracy_matrix(summary, method, s) for s in seeds]
        out[method] = {name: [f(R) for R in matrices] for name, f in
                       (("ACC", average_accuracy), ("BWT", backward_transfer),
                        ("forgetting", forgetting))}
    return out


def lifelong_report(summary: pd.DataFrame, header: str, folder: Path) -> tuple[str, str]:
    """The printed table and its one-line verdict; heatmaps into ``folder``/lifelong.png."""
    seeds = sorted(summary.seed.unique())
    means = {m: np.mean([accuracy_matrix(summary, m, s) for s in seeds], axis=0)
             for m in METHODS}
    found = figures(summary)
    lines = [header, _setting_line(summary, len(seeds))]
    for method in METHODS:
        lines += _matrix_lines(NAMES[method], means[method])
    lines.append(f"{'learner':<20} {'ACC (avg acc)':>16} {'BWT':>16} {'forgetting':>16}")
    for method in METHODS:
        values = found[method]
        lines.append(f"{NAMES[method]:<20} " + " ".join(
            f"{mean_std(values[k]):>16}" for k in ("ACC", "BWT", "forgetting")))
    verdict = _verdict(found["lwf"]["ACC"], found["finetune"]["ACC"])
    lines += [verdict, "ACC, BWT: Lopez-Paz & Ranzato 2017; forgetting: Chaudhry et al. 2018 "
              "(docs/lifelong.md)"]
    draw_heatmaps(folder / "lifelong.png", means)
    lines.append(f"heatmaps: {folder / 'lifelong.png'}")
    line = (f"LwF ACC {statistics.mean(found['lwf']['ACC']):.2f}, fine-tune "
            f"{statistics.mean(found['finetune']['ACC']):.2f}, joint "
            f"{statistics.mean(found['joint']['ACC']):.2f}")
    return "\n".join(lines), line


def _setting_line(summary: pd.DataFrame, seeds: int) -> str:
    tasks = int(summary.task.max())
    return (f"{tasks} tasks, test accuracy (%) on each task (columns) after each task learnt "
            f"(rows), each task's last epoch, mean over {seeds} student seed(s)")


def _matrix_lines(name: str, R: np.ndarray) -> list[str]:
    tasks = len(R)
    corner = "after \\ on"
    lines = [f"{name}:", f"  {corner:<13}" + "".join(f"{f'task{j + 1}':>8}"
                                                   for j in range(tasks))]
    for i in range(tasks):
        cells = "".join(f"{R[i, j]:8.2f}" if j <= i else f"{'':>8}" for j in range(tasks))
        lines.append(f"  {f'after task{i + 1}':<13}{cells}".rstrip())
    return lines


def _verdict(lwf: list[float], finetune: list[float]) -> str:
    gains = [a - b for a, b in zip(lwf, finetune)]
    if len(gains) < 2:
        return (f"LwF - fine-tune ACC {gains[0]:+.2f}: one student seed, so its noise is "
                f"unknown (set repeats=3 or more)")
    test = gain_test(gains)
    verdict = {"helps": "LwF keeps more than fine-tuning", "hurts": "LwF keeps less than "
               "fine-tuning"}.get(test.verdict, "not significant: no evidence that LwF keeps "
                                  "more than fine-tuning here")
    return (f"LwF - fine-tune ACC {test.mean:+.2f}, 95% CI [{test.ci_low:+.2f}, "
            f"{test.ci_high:+.2f}] over {test.n} paired student seeds, paired t-test "
            f"{format_p(test.p)}: {verdict}")


def draw_heatmaps(path: Path, means: dict[str, np.ndarray]) -> None:
    """One panel per learner: task (rows) x after task (columns), mean accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(means), figsize=(3.6 * len(means), 3.4), squeeze=False)
    for ax, (method, R) in zip(axes[0], means.items()):
        shown = R.T  # rows: the task tested; columns: after which task
        image = ax.imshow(shown, vmin=0, vmax=100, cmap="viridis")
        tasks = len(R)
        for j in range(tasks):
            for i in range(j, tasks):
                ax.text(i, j, f"{shown[j, i]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if shown[j, i] < 60 else "black")
        ax.set_xticks(range(tasks), [str(i + 1) for i in range(tasks)])
        ax.set_yticks(range(tasks), [str(i + 1) for i in range(tasks)])
        ax.set_xlabel("after task")
        ax.set_ylabel("accuracy on task")
        ax.set_title(NAMES[method], fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="test accuracy (%)")
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
