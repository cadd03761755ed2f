"""kdrun's CIFAR-100 benchmark results beside the published ones
(``kdrun/sweep/published.csv``, shipped with the package: per teacher/student pair and
method, the teacher, student-alone and distilled top-1 of the papers, with their
source).

The papers report the best *test* accuracy over all epochs; kdrun reports the test
accuracy at the best-*validation* epoch. Both are shown: kdrun's own figure, and kdrun's
best test epoch, the papers' measure, which is what the difference is taken on.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kdrun.errors import UserError
from kdrun.report.table import markdown_table

PUBLISHED_CSV = Path(__file__).with_name("published.csv")  # package data: found when installed
COLUMNS = ("pair", "teacher", "student", "method", "teacher_acc", "student_acc",
           "distilled_acc", "spread", "source")
NOTE = ("Published figures are the best test accuracy over epochs (a choice made on the "
        "test set); kdrun's own figure is the test accuracy at the best-validation epoch, "
        "and `best test epoch` is kdrun's run measured the papers' way, which the "
        "difference is taken on. The papers' authors say runs vary by about ±0.2-0.5.")


def read_published(path: Path = PUBLISHED_CSV) -> pd.DataFrame:
    """The published table, checked for its columns."""
    try:
        table = pd.read_csv(path)
    except (OSError, pd.errors.ParserError) as e:
        raise UserError(f"--published {path}: not a readable CSV ({e})") from e
    missing = [c for c in COLUMNS if c not in table]
    if missing:
        raise UserError(f"--published {path}: missing columns {', '.join(missing)}; "
                        f"expected {', '.join(COLUMNS)}")
    return table


def beside_published(summary: pd.DataFrame, metrics: pd.DataFrame,
                     published: pd.DataFrame) -> pd.DataFrame:
    """One row per CIFAR-100 job whose teacher, student and method have a published
    figure: kdrun's accuracies (mean over student seeds) beside the papers'."""
    rows = []
    for job, runs in summary.groupby("job", sort=True):
        if "dataset" in runs and runs.dataset.iloc[0] != "cifar100":
            continue
        teacher, scratch = runs[runs.role == "teacher"], runs[runs.role == "scratch"]
        distilled = runs[runs.role == "distilled"]
        if teacher.empty or distilled.empty:
            continue
        match = published[(published.teacher == teacher.arch.iloc[0])
                          & (published.student == distilled.arch.iloc[0])
                          & (published.method == distilled.method.iloc[0])]
        if match.empty:
            continue
        paper = match.iloc[0]
        best_test = _best_test_epoch(metrics[metrics.job == job], "distilled")
        rows.append({
            "pair": f"{paper.teacher} -> {paper.student}", "method": paper.method,
            "seeds": len(distilled),
            "teacher": _pair(teacher.test_metric_best_val.mean(), paper.teacher_acc),
            "student alone": _pair(scratch.test_metric_best_val.mean(), paper.student_acc),
            "distilled": _pair(distilled.test_metric_best_val.mean(), paper.distilled_acc),
            "distilled, best test epoch": f"{best_test:.2f}",
            "difference": f"{best_test - paper.distilled_acc:+.2f}",
            "source": paper.source})
    return pd.DataFrame(rows)


def _best_test_epoch(metrics: pd.DataFrame, stage: str) -> float:
    """The best test accuracy over epochs of a stage, mean over its seeds."""
    test = metrics[(metrics.stage == stage) & (metrics.split == "test")]
    return float(test.groupby("seed").score.max().mean())


def _pair(ours: float, theirs: float) -> str:
    return f"{ours:.2f} / {theirs:.2f}"


def published_section(summary: pd.DataFrame, metrics: pd.DataFrame, path: Path) -> list[str]:
    """The report's markdown section with the comparison, or why there is none."""
    table = beside_published(summary, metrics, read_published(path))
    lines = ["## Beside the published numbers", "",
             f"Published figures from `{path.name}`; each cell is kdrun / published. {NOTE}",
             ""]
    if table.empty:
        return lines + ["No job of this sweep has a published figure (CIFAR-100, a pair and "
                        "method listed there).", ""]
    return lines + [markdown_table(table), ""]
