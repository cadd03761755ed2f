"""A student search's report (a sweep over student keys, e.g. hparams_search=student_search):
per candidate architecture its size, its latency and the scratch and distilled students'
accuracy; the Pareto front of accuracy against parameters and against latency for each;
the front's knee; the smallest student within a tolerance of the teacher; and whether
distillation changes the ranking of the candidates.

The front is chosen on validation accuracy (test accuracy never selects anything); the
test accuracy of each point is shown beside it."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from kdrun.report.statistics import format_p

COSTS = {"params": "parameters", "latency_ms_b1": "latency (ms, batch 1)"}
KINDS = ("scratch", "distilled")


def is_student_search(swept: list[str]) -> bool:
    return any(key.startswith("student.") for key in swept)


def pareto_front(score: pd.Series, cost: pd.Series) -> pd.Series:
    """Whether each point is on the front: no other point has a score at least as high at
    a cost at most as low, better in one of the two. NaN points are never on it."""
    points = list(zip(score, cost))

    def dominated(s, c) -> bool:
        return any(s2 >= s and c2 <= c and (s2 > s or c2 < c) for s2, c2 in points)
    return pd.Series([not (math.isnan(s) or math.isnan(c)) and not dominated(s, c)
                      for s, c in points], index=score.index)


def knee(score: pd.Series, cost: pd.Series, front: pd.Series):
    """The front's point farthest from the straight line between its two ends, with cost
    on a log scale and both axes scaled to [0, 1] (the "Kneedle" idea, Satopää et al.
    2011): where more cost stops buying much score. None with fewer than 3 points."""
    if front.sum() < 3:
        return None
    x = np.log10(cost[front].astype(float))
    y = score[front].astype(float)
    x, y = (x - x.min()) / (x.max() - x.min() or 1), (y - y.min()) / (y.max() - y.min() or 1)
    order = x.sort_values().index
    (x0, y0), (x1, y1) = (x[order[0]], y[order[0]]), (x[order[-1]], y[order[-1]])
    distance = ((y1 - y0) * x - (x1 - x0) * y + x1 * y0 - y1 * x0).abs()
    return distance.idxmax()


def smallest_within(score: pd.Series, params: pd.Series, teacher: float, tolerance: float):
    """The candidate with the fewest parameters whose score is at most ``tolerance`` points
    below the ``teacher``'s; None when none is."""
    close = score >= teacher - tolerance
    return params[close].idxmin() if close.any() else None


def candidates(summary: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per candidate (the setting ``keys``): params, latency, and per kind
    (scratch, distilled) the mean validation and test accuracy over the student seeds."""
    students = summary[summary.role.isin(KINDS)]
    rows = []
    for setting, group in students.groupby(keys, dropna=False, sort=True):
        setting = setting if isinstance(setting, tuple) else (setting,)
        row = {**dict(zip(keys, setting)), "arch": group.arch.iloc[0],
               "params": int(group.params.iloc[0]),
               "latency_ms_b1": group.latency_ms_b1.median()
               if "latency_ms_b1" in group else float("nan")}
        for kind in KINDS:
            rows_of = group[group.role == kind]
            row[f"{kind}_val"] = rows_of.val_metric_best.mean()
            row[f"{kind}_test"] = rows_of.test_metric_best_val.mean()
        rows.append(row)
    return pd.DataFrame(rows)


def mark_fronts(table: pd.DataFrame, teacher: float, tolerance: float) -> pd.DataFrame:
    """``table`` (candidates) with, per kind and cost, front membership, the knee, and the
    smallest candidate within ``tolerance`` of the ``teacher`` (test accuracy)."""
    table = table.copy()
    for kind in KINDS:
        for cost in COSTS:
            front = pareto_front(table[f"{kind}_val"], table[cost])
            table[f"{kind}_front_{cost}"] = front
            table[f"{kind}_knee_{cost}"] = table.index == knee(table[f"{kind}_val"],
                                                               table[cost], front)
        table[f"{kind}_smallest_close"] = table.index == smallest_within(
            table[f"{kind}_test"], table.params, teacher, tolerance)
    return table


def rank_correlation(table: pd.DataFrame) -> str:
    """Spearman's rank correlation of the candidates' scratch and distilled test accuracy,
    in a sentence, with the best candidate of each."""
    from scipy.stats import spearmanr

    n = len(table)
    best = {kind: table.arch[table[f"{kind}_val"].idxmax()] for kind in KINDS}
    same = ("the same candidate is best either way" if best["scratch"] == best["distilled"]
            else f"the best candidate (on validation) is {best['scratch']} from scratch but "
                 f"{best['distilled']} distilled")
    if n < 3:
        return f"{n} candidates: too few to rank; {same}."
    rho, p = spearmanr(table.scratch_test, table.distilled_test)
    changes = ("distillation keeps the ranking" if rho >= 0.9 else
               "distillation changes the ranking of the candidates")
    return (f"Spearman rank correlation of scratch and distilled test accuracy over {n} "
            f"candidates: rho = {rho:+.2f} ({format_p(p)}): {changes}; {same}.")
