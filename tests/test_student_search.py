"""The student search: Pareto front membership, the knee and the smallest student within a
tolerance against hand computation; what a job returns to a multi-objective sweeper; and a
small grid through the sweep report."""

from __future__ import annotations

import subprocess

import pandas as pd
import pytest

from kdrun.errors import UserError
from kdrun.run.search import sweep_values
from kdrun.sweep.pareto import knee, pareto_front, rank_correlation, smallest_within
from tests.helpers import KDRUN, QUICK_LATENCY, make_config


def test_front_membership_matches_hand_computation():
    # a: 50 at 10; b: 60 at 20; c: 55 at 30 (b is better and cheaper: dominated);
    # d: 60 at 40 (as good as b, dearer: dominated); e: 70 at 40; f: NaN
    score = pd.Series([50.0, 60.0, 55.0, 60.0, 70.0, float("nan")], index=list("abcdef"))
    cost = pd.Series([10, 20, 30, 40, 40, 5], index=list("abcdef"))
    front = pareto_front(score, cost)
    assert list(front[front].index) == ["a", "b", "e"]
    tie = pareto_front(pd.Series([60.0, 60.0]), pd.Series([20, 20]))  # equal: neither beats
    assert tie.all()


def test_the_knee_is_the_front_point_farthest_from_the_chord_on_a_log_cost_axis():
    # costs 10, 100, 1000 -> x 0, 0.5, 1; scores 0, 90, 100 -> y 0, 0.9, 1: the middle point
    # is 0.4 / sqrt(2) from the line y = x, the ends 0
    score = pd.Series([0.0, 90.0, 100.0], index=["s", "m", "l"])
    cost = pd.Series([10, 100, 1000], index=["s", "m", "l"])
    assert knee(score, cost, pareto_front(score, cost)) == "m"
    assert knee(score[:2], cost[:2], pareto_front(score[:2], cost[:2])) is None  # too few


def test_the_smallest_student_within_the_tolerance_of_the_teacher():
    score = pd.Series([88.0, 89.5, 91.0], index=["s", "m", "l"])
    params = pd.Series([100, 200, 400], index=["s", "m", "l"])
    assert smallest_within(score, params, teacher=90.0, tolerance=1.0) == "m"
    assert smallest_within(score, params, teacher=90.0, tolerance=2.0) == "s"
    assert smallest_within(score, params, teacher=95.0, tolerance=1.0) is None


def test_rank_correlation_says_whether_distillation_reorders_the_candidates():
    table = pd.DataFrame({"arch": ["a", "b", "c", "d"],
                          "scratch_test": [50.0, 60.0, 70.0, 80.0],
                          "distilled_test": [80.0, 70.0, 60.0, 50.0],
                          "scratch_val": [50.0, 60.0, 70.0, 80.0],
                          "distilled_val": [80.0, 70.0, 60.0, 50.0]})
    line = rank_correlation(table)
    assert "rho = -1.00" in line and "changes the ranking" in line
    assert "d from scratch but a distilled" in line


def test_a_job_returns_its_objectives_in_order():
    result = {"distilled_val_metric": 71.5,
              "rows": [{"role": "teacher", "params": 9000, "latency_ms_b1": 2.0},
                       {"role": "distilled", "params": 700, "latency_ms_b1": 0.25},
                       {"role": "distilled", "params": 700, "latency_ms_b1": 0.35}]}
    assert sweep_values(["val_metric"], result) == 71.5
    assert sweep_values(["val_metric", "params", "latency_ms_b1"], result) == [71.5, 700.0, 0.3]


def test_an_unknown_objective_is_one_line_naming_the_valid_ones():
    from kdrun.run.validate import validate

    with pytest.raises(UserError, match=r"search.objectives.*val_metric, params, latency_ms_b1"):
        validate(make_config("search.objectives=[accuracy]"))


@pytest.mark.slow  # a 3-candidate sweep (~40 s)
def test_a_student_grid_writes_the_pareto_table_and_plot_and_trains_one_teacher(tmp_path):
    proc = subprocess.run(
        [KDRUN, "hparams_search=student_search",
         "student.hidden=[8],[32],[32,32]", "trainer.epochs=2",
         "repeats=2", "split.max_train=500", "progress=false", "num_threads=1",
         *QUICK_LATENCY, f"hydra.sweep.dir={tmp_path}/sweep", f"cache.dir={tmp_path}/cache"],
        cwd=tmp_path, text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pd.read_csv(tmp_path / "sweep" / "pareto.csv")
    assert sorted(table.params) == sorted(set(table.params)) and len(table) == 3
    assert {"scratch_front_params", "distilled_front_latency_ms_b1", "distilled_knee_params",
            "distilled_smallest_close"} <= set(table.columns)
    smallest = table[table.params == table.params.min()]
    assert smallest.scratch_front_params.all() and smallest.distilled_front_params.all()
    assert (tmp_path / "sweep" / "pareto.png").stat().st_size > 0
    report = (tmp_path / "sweep" / "report.md").read_text()
    assert "## Student search" in report and "Spearman rank correlation" in report
    summary = pd.read_csv(tmp_path / "sweep" / "summary.csv")
    assert summary[summary.role == "teacher"].cache_key.nunique() == 1  # one teacher for all
