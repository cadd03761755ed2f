"""The statistics of a comparison, computed once for the run's table and the sweep's
report: the paired gain of distilled over scratch students, its t-test and its verdict."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import pandas as pd

from kdrun.data.metrics import ACCURACY, Metric

# what a scratch and a distilled student must share for their difference to be a gain
PAIRED_COLUMNS = ("seed", "device", "precision", "torch", "data_sha256")


def paired_gain(scratch: pd.DataFrame, distilled: pd.DataFrame, column: str,
                by: tuple[str, ...] = ("seed",)) -> pd.Series:
    """Distilled minus scratch ``column`` of the same ``by`` (the seed; in a sweep, the
    job and the seed), one value per distilled row, in its order. A distilled row
    without its scratch twin, or one whose data or numerics differ, is a bug, never a
    number to print."""
    keys = list(by)
    checked = [c for c in PAIRED_COLUMNS if c in scratch and c in distilled and c not in keys]
    twins = scratch.drop_duplicates(keys)[keys + checked + [column]]
    found = distilled[keys + checked + [column]].merge(
        twins, on=keys, how="left", suffixes=("", "_scratch"), indicator=True)
    unpaired = (found["_merge"] != "both").any() or any(
        not found[c].astype(str).equals(found[f"{c}_scratch"].astype(str)) for c in checked)
    if unpaired:
        raise RuntimeError(f"scratch and distilled rows are not paired on {keys + checked}")
    return pd.Series(found[column].to_numpy() - found[f"{column}_scratch"].to_numpy(),
                     index=distilled.index)


@dataclass
class GainTest:
    """A two-sided paired t-test of the mean gain against zero, at the 95% level."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    p: float
    higher_is_better: bool = True  # the metric's direction: which sign of the gain helps

    @property
    def verdict(self) -> str:
        if self.n < 2:
            return f"unknown ({self.n} seed)"
        if self.p < 1 - LEVEL:
            return "helps" if (self.mean > 0) == self.higher_is_better else "hurts"
        return "not significant"


LEVEL = 0.95  # confidence level of every interval kdrun prints


def gain_test(gains: list[float], metric: Metric = ACCURACY) -> GainTest:
    """Student-t interval and p-value of the mean of paired gains (n - 1 degrees of
    freedom); the same numbers as ``scipy.stats.ttest_1samp(gains, 0)``. Whether a
    significant gain helps or hurts follows the ``metric``'s direction."""
    from scipy.stats import t

    n, mean = len(gains), statistics.mean(gains)
    direction = metric.higher_is_better
    if n < 2:
        nan = float("nan")
        return GainTest(n, mean, nan, nan, nan, nan, direction)
    std = statistics.stdev(gains)
    if std == 0:  # every replicate gained the same: no spread to test against
        return GainTest(n, mean, 0.0, mean, mean, 1.0 if mean == 0 else 0.0, direction)
    se = std / n**0.5
    half = t.ppf((1 + LEVEL) / 2, n - 1) * se
    p = 2 * t.sf(abs(mean) / se, n - 1)
    return GainTest(n, mean, std, mean - half, mean + half, float(p), direction)


def format_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def gain_verdict(gains: list[float], teacher: str | None, draw: str | None = None,
                 metric: Metric = ACCURACY) -> str:
    """One sentence: the interval, what it is taken over, the p-value, the verdict, and
    what it holds for: this teacher, and with a label budget this draw of labels."""
    over = f"{len(gains)} paired student seeds" + (f" under {teacher}" if teacher else "")
    if draw:
        over += f" and {draw}"
    if len(gains) < 2:
        return "one student seed, so its noise is unknown (set repeats=3 or more)"
    test = gain_test(gains, metric)
    where = (f"95% CI [{test.ci_low:+.2f}, {test.ci_high:+.2f}] over {over}, paired t-test "
             f"{format_p(test.p)}")
    held = [what for what, given in (("teacher", teacher), ("draw of labelled examples", draw))
            if given]
    scope = (f" (for this {' and this '.join(held)}: other teacher seeds"
             f"{' and draws (split.seed)' if draw else ''} may differ)") if held else ""
    if test.verdict in ("helps", "hurts"):
        return f"{where}: distillation {test.verdict}, beyond student-seed noise{scope}"
    return (f"{where}: not significant, no evidence that distillation changes {metric.name} "
            f"here")
