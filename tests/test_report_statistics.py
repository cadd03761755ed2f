"""The verdict is one test that is what it says (a paired t-test at 95%, with its
p-value) and says what it covers; speed-ups are measured side by side."""

from __future__ import annotations

import statistics
import time

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from scipy import stats

from kdrun.report.measure import round_to_spread, side_by_side
from kdrun.report.statistics import gain_test, gain_verdict
from kdrun.run.summary_row import RowContext, SummaryRow


@pytest.mark.parametrize("gains", [[1.0, 2.5, 0.5], [0.3, -0.2, 0.9, 1.4, 0.1], [-2.0, -1.0]])
def test_interval_and_p_value_are_scipys(gains):
    test = gain_test(gains)
    low, high = stats.t.interval(0.95, len(gains) - 1, loc=statistics.mean(gains),
                                 scale=stats.sem(gains))
    assert (test.ci_low, test.ci_high) == pytest.approx((low, high))
    assert test.p == pytest.approx(stats.ttest_1samp(gains, 0).pvalue)
    assert test.verdict == ("not significant" if test.p >= 0.05 else
                            "helps" if test.mean > 0 else "hurts")


def test_no_extra_one_std_rule_overrides_the_stated_95_percent_test():
    gains = [2.0, -0.5, 1.5, 0.8, 2.6, -0.4, 1.9, 0.2, 2.2, -0.3]  # |mean| < std, p < 0.05
    assert abs(statistics.mean(gains)) < statistics.stdev(gains)
    assert stats.ttest_1samp(gains, 0).pvalue < 0.05
    assert gain_test(gains).verdict == "helps"


def test_identical_gains_have_no_spread_to_test_against():
    assert gain_test([0.0, 0.0, 0.0]).verdict == "not significant"
    assert gain_test([1.0, 1.0]).verdict == "helps"


def test_the_verdict_says_it_holds_for_one_teacher_and_gives_p():
    text = gain_verdict([1.0, 2.5, 1.5, 2.0], "one teacher (seed 0)")
    assert "over 4 paired student seeds under one teacher (seed 0)" in text
    assert "p = 0.0" in text and "for this teacher" in text


def test_spread_decides_the_digits():
    assert round_to_spread(2.8349, 0.12) == 2.8
    assert round_to_spread(2.8349, 0.012) == 2.83
    assert round_to_spread(12.8349, 1.5) == 13.0


def test_students_of_one_architecture_share_one_side_by_side_speedup():
    nn = torch.nn
    teacher = nn.Sequential(nn.Linear(40, 512), nn.ReLU(), nn.Linear(512, 10))
    student = torch.nn.Linear(40, 10)
    context = RowContext(seed=0, eval_split="test", selected_by="val", provenance={}, run={})

    def row(role, params, size_mb):
        return SummaryRow.evaluated_teacher(context, "mlp", {"params": params, "size_mb": size_mb},
                                            90.0, 90.0, train_seconds=1.0, reused=False
                                            ).as_role(role)

    rows = [row("teacher", 26122, 0.1), row("teacher1", 26122, 0.1), row("scratch", 410, 0.002),
            row("distilled", 410, 0.002), row("scratch", 410, 0.002)]
    timing = side_by_side(teacher, student, (40,), torch.device("cpu"),
                          OmegaConf.create({"repeats_b1": 7, "repeats_b256": 5, "warmup": 1}))
    rows = [r.with_figures(timing, teacher_params=26122).columns() for r in rows]
    students = rows[2:]
    assert len({(r["speedup_b1"], r["speedup_b256"], r["latency_ms_b1"]) for r in students}) == 1
    assert rows[2]["compression"] == pytest.approx(26122 / 410, rel=1e-3)
    assert "latency_ms_b1" not in rows[1]  # an ensemble member: the ensemble is timed
    assert "compression" not in rows[0] and "speedup_b1" not in rows[0]
    assert rows[0]["latency_ms_b256"] > rows[2]["latency_ms_b256"]


LOAD = """
import time, torch
torch.set_num_threads(2)
a = torch.randn(1000, 1000)
end = time.time() + 120
while time.time() < end:
    a @ a
"""


def test_under_cpu_load_a_speedup_is_marked_unreliable_or_stays_within_2x_of_the_quiet_one():
    """Another torch process on the cores made kdrun print 593x where a quiet machine
    gives ~3x: the timing now notices that its rounds disagree."""
    import subprocess
    import sys

    from kdrun.models import build_model
    from kdrun.report.measure import BATCHES, _time_side_by_side
    from tests.helpers import make_config

    cfg = make_config()
    teacher, student = (build_model(cfg[role], (1, 40), 10) for role in ("teacher", "student"))
    timing = OmegaConf.create({"repeats_b1": 21, "repeats_b256": 5, "warmup": 2})
    quiet = _time_side_by_side(teacher, student, (1, 40), torch.device("cpu"), timing)
    load = subprocess.Popen([sys.executable, "-c", LOAD])
    try:
        time.sleep(1.0)  # the load is running
        busy = _time_side_by_side(teacher, student, (1, 40), torch.device("cpu"), timing)
    finally:
        load.kill()
        load.wait()
    for batch in BATCHES:
        if busy.reliable[batch]:
            assert quiet.speedup[batch] / 2 <= busy.speedup[batch] <= quiet.speedup[batch] * 2


def test_rounds_that_disagree_are_not_a_figure():
    from kdrun.report.measure import rounds_agree
    from kdrun.report.table import _speed_line

    assert rounds_agree([0.074, 0.075, 0.08, 0.073], [0.032, 0.031, 0.033, 0.032])
    # what a busy machine gave: most teacher passes stalled, the student's never
    stalled = [24.6, 25.1, 0.074, 24.0, 23.8, 26.0]
    assert not rounds_agree(stalled, [0.035] * 6)
    assert not rounds_agree([0.07, 0.07, 0.21, 0.21], [0.03] * 4)  # quartiles 3x apart
    row = pd.Series({"compression": 1.86, "size_mb": 0.064, "speedup_b1": 695.5,
                     "speedup_b256": 5.2, "speedup_b1_reliable": False,
                     "speedup_b256_reliable": True})
    line = _speed_line(row)
    assert "695" not in line and "5.2x at batch 256" in line
    assert "speed-up at batch 1 not measured: the machine was busy" in line


def test_a_verdict_under_a_label_budget_holds_for_its_draw_of_labels():
    from kdrun.run.pipeline import _label_draw
    from tests.helpers import make_config

    assert _label_draw(make_config()) is None
    draw = _label_draw(make_config("split.labeled=1000", "split.seed=3"))
    assert draw == "one draw of the labelled examples (split.seed=3)"
    text = gain_verdict([2.0, 2.5, 3.0], "one teacher (seed 0)", draw)  # helps
    assert "under one teacher (seed 0) and one draw of the labelled examples (split.seed=3)" \
        in text
    assert text.endswith("(for this teacher and this draw of labelled examples: other teacher "
                         "seeds and draws (split.seed) may differ)")
    assert "draw" not in gain_verdict([1.0, 2.5, 3.0], "one teacher (seed 0)")
