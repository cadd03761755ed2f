"""The sweep report pools only replicates: every swept setting is reported apart, in its
own column, and students are nested in their teachers."""

from __future__ import annotations

import statistics

import pandas as pd
import pytest
from omegaconf import OmegaConf
from scipy import stats

from kdrun.sweep.report import write_report
from tests.test_sweep import FAST, kdrun


def fake_job(sweep, name, overrides, teacher_key, students, T=4.0, alpha=0.9):
    """A finished job folder: Hydra's overrides record, a summary and metrics.
    ``students`` maps a student seed to its (scratch, distilled) test accuracy."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    common = {"method": "dkd", "T": T, "alpha": alpha, "device": "cpu", "precision": "fp32",
              "torch": "2.x", "data_sha256": "d", "eval_split": "test"}
    rows = [{"role": "teacher", "seed": 0, "test_metric_best_val": 90.0, "val_metric_best": 90.0,
             "cache_key": teacher_key, **common}]
    for seed, (scratch, distilled) in students.items():
        rows += [{"role": "scratch", "seed": seed, "test_metric_best_val": scratch,
                  "val_metric_best": scratch, "cache_key": f"s{seed}", **common},
                 {"role": "distilled", "seed": seed, "test_metric_best_val": distilled,
                  "val_metric_best": distilled, "cache_key": f"d{name}{seed}", **common}]
    pd.DataFrame(rows).to_csv(job / "summary.csv", index=False)
    pd.DataFrame([{"stage": s, "seed": 0, "epoch": 1, "split": "val", "score": 50.0}
                  for s in ("teacher", "scratch", "distilled")]).to_csv(job / "metrics.csv",
                                                                          index=False)


def report_table(sweep):
    text = write_report(sweep).read_text()
    section = text.split("## Distillation gain per setting")[1].split("## Best setting")[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return text, [dict(zip(header, (c.strip() for c in ln.strip("|").split("|"))))
                  for ln in lines[2:]]


def test_trials_that_differ_only_in_a_methods_own_weight_are_reported_apart(tmp_path):
    """An Optuna search over loss.dkd_beta: each trial is its own setting, never pooled."""
    for i, beta in enumerate((1.5, 4.25, 7.0)):
        fake_job(tmp_path, str(i), ["loss=dkd", f"loss.dkd_beta={beta}", "progress=false"],
                 "t0", {0: (60.0, 60.0 + i), 1: (61.0, 61.5 + i)})
    text, rows = report_table(tmp_path)
    assert [r["loss.dkd_beta"] for r in rows] == ["1.5", "4.25", "7"]  # sorted as numbers
    assert "progress" not in rows[0] and "Common to every finished job: `loss=dkd`" in text
    assert [r["gain"].split()[0] for r in rows] == ["+0.25", "+1.25", "+2.25"]
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert "loss.dkd_beta" in summary.columns


def test_teacher_seeds_are_pooled_as_teachers_means_with_the_spread_within_beside(tmp_path):
    gains = {0: [1.0, 2.0, 3.0], 1: [-1.0, 0.0, 0.5], 2: [2.0, 2.5, 4.0]}
    for seed, per_student in gains.items():
        students = {10 * seed + i: (50.0, 50.0 + g) for i, g in enumerate(per_student)}
        fake_job(tmp_path, f"seed={seed}", [f"seed={seed}"], f"t{seed}", students)
    _, rows = report_table(tmp_path)
    assert len(rows) == 1  # the seeds are replicates of one setting
    row = rows[0]
    means = [statistics.mean(g) for g in gains.values()]
    low, high = stats.t.interval(0.95, len(means) - 1, loc=statistics.mean(means),
                                 scale=stats.sem(means))
    assert row["95% CI"] == f"[{low:+.2f}, {high:+.2f}]"
    assert row["p"] == f"p = {stats.ttest_1samp(means, 0).pvalue:.3f}"
    within = (statistics.mean(statistics.variance(g) for g in gains.values())) ** 0.5
    assert row["within_teacher_std"] == f"{within:.2f}"
    assert row["teachers"] == "3" and row["students"] == "9"
    assert row["interval_over"] == "3 teachers' mean gains"


def test_one_teachers_students_give_an_interval_that_says_so(tmp_path):
    fake_job(tmp_path, "a", ["loss.T=2"], "t0", {0: (50.0, 51.0), 1: (50.0, 52.5)}, T=2.0)
    fake_job(tmp_path, "b", ["loss.T=8"], "t0", {0: (50.0, 49.0), 1: (50.0, 50.5)}, T=8.0)
    _, rows = report_table(tmp_path)
    assert [r["loss.T"] for r in rows] == ["2", "8"]
    assert {r["interval_over"] for r in rows} == {"2 student seeds, 1 teacher"}


@pytest.mark.slow  # a sweep of four jobs, ~7 s (make test < 5 min)
def test_a_student_width_by_temperature_sweep_reports_four_settings(tmp_path):
    kdrun(tmp_path, "-m", "student.hidden=[50],[100]", "loss.T=2,4", *FAST, "repeats=2")
    (sweep,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    text, rows = report_table(sweep)
    assert sorted((r["student.hidden"], r["loss.T"]) for r in rows) == [
        ("[100]", "2"), ("[100]", "4"), ("[50]", "2"), ("[50]", "4")]
    assert all(r["verdict"] and r["95% CI"] != "[nan, nan]" for r in rows)
    summary = pd.read_csv(sweep / "summary.csv")
    assert {"student.hidden", "loss.T"} <= set(summary.columns)
    distilled = summary[summary.role == "distilled"]
    assert distilled.groupby(["student.hidden", "loss.T"]).size().tolist() == [2, 2, 2, 2]
    assert "student.hidden=[100]" in text  # the heatmap panels and best setting name it


@pytest.mark.slow
def test_optuna_over_a_methods_weight_reports_each_trial(tmp_path):
    from tests.test_recipes import TINY

    kdrun(tmp_path, "hparams_search=dkd_optuna", "hydra.sweeper.n_trials=3",
          "hydra.sweeper.sampler.n_startup_trials=3", *TINY)
    (sweep,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    _, rows = report_table(sweep)
    assert len(rows) == 3 and len({r["loss.dkd_beta"] for r in rows}) == 3


def test_teachers_without_a_stage_key_are_told_apart_by_their_seed(tmp_path):
    """An ensemble's combined teacher has no cache key: its seed names it."""
    for seed in (0, 1):
        fake_job(tmp_path, f"seed={seed}", [f"seed={seed}"], None,
                 {10 * seed: (50.0, 51.0 + seed), 10 * seed + 1: (50.0, 52.0 + seed)})
        summary = pd.read_csv(tmp_path / f"seed={seed}" / "summary.csv")
        summary.loc[summary.role == "teacher", "seed"] = seed
        summary.to_csv(tmp_path / f"seed={seed}" / "summary.csv", index=False)
    _, rows = report_table(tmp_path)
    assert rows[0]["teachers"] == "2" and rows[0]["interval_over"] == "2 teachers' mean gains"


def test_jobs_that_differ_only_in_threads_are_one_setting_and_the_report_says_so(tmp_path):
    """num_threads only reorders the arithmetic: the two jobs pool into one setting, and
    the report names the thread counts their stages ran with."""
    for threads, seed in ((1, 0), (2, 1)):
        fake_job(tmp_path, f"t{threads}", [f"num_threads={threads}", f"seed={seed}"],
                 f"t{seed}", {seed: (60.0, 62.0 + seed)})
        path = tmp_path / f"t{threads}" / "summary.csv"
        pd.read_csv(path).assign(threads=threads).to_csv(path, index=False)
    text, rows = report_table(tmp_path)
    assert len(rows) == 1 and rows[0]["teachers"] == "2" and "num_threads" not in rows[0]
    assert "only reorder the floating-point arithmetic" in text and "`threads` (1, 2)" in text


def test_the_gain_figure_fits_the_swept_keys_and_numbers_sort_as_numbers(tmp_path):
    from kdrun.sweep.plots import _curves_title

    budgets = tmp_path / "budgets"
    for i, labeled in enumerate((2000, 250, 1000, 500)):
        fake_job(budgets, f"b{i}", [f"split.labeled={labeled}"], "t", {0: (60, 61), 1: (60, 62)})
    text, rows = report_table(budgets)
    assert [r["split.labeled"] for r in rows] == ["250", "500", "1000", "2000"]
    assert (budgets / "gain_vs_split.labeled.png").is_file()
    assert not (budgets / "gain_heatmap.png").exists()

    methods = tmp_path / "methods"
    for i, loss in enumerate(("kd", "fitnet", "rkd", "sp", "pkt", "dkd", "dist", "at", "crd")):
        fake_job(methods, f"m{i}", [f"loss={loss}"], "t", {0: (60, 61 + i), 1: (60, 62)})
    _, rows = report_table(methods)
    assert len(rows) == 9 and (methods / "gain_by_setting.png").is_file()  # every method

    grid = tmp_path / "grid"
    for i, (T, alpha) in enumerate(((1, 0.5), (1, 0.9), (4, 0.5), (4, 0.9))):
        fake_job(grid, f"g{i}", [f"loss.T={T}", f"loss.alpha={alpha}", "student.hidden=[50]"],
                 "t", {0: (60, 61), 1: (60, 62)})
    report_table(grid)
    assert (grid / "gain_heatmap.png").is_file() and not list(grid.glob("gain_vs_*.png"))
    best = pd.Series({"split.labeled": 1000, "teachers": 1, "labelled": 1000})
    assert _curves_title(best, ["split.labeled"]) == (
        "best setting on validation: split.labeled=1000\n(1 teacher, 1,000 labels)")


def test_jobs_of_one_setting_under_two_torch_versions_stay_apart_in_table_and_figures(tmp_path):
    from kdrun.sweep.report import _write_report

    for i, (T, torch_version) in enumerate(((2, "2.x"), (4, "2.x"), (2, "3.x"), (4, "3.x"))):
        fake_job(tmp_path, f"j{i}", [f"loss.T={T}", f"trainer.lr={0.1 if i < 2 else 0.2}"],
                 f"t{i // 2}", {0: (60.0, 61.0 + i), 1: (61.0, 62.5 + i)})
        path = tmp_path / f"j{i}" / "summary.csv"
        pd.read_csv(path).assign(torch=torch_version).to_csv(path, index=False)
    _, lines = _write_report(tmp_path)
    assert len(lines) == 4
    assert all("torch=" not in line for line in lines)  # the versions follow trainer.lr here
    for i in (2, 3):  # now the same trainer.lr under another torch: kept apart, and named
        overrides = tmp_path / f"j{i}" / ".hydra" / "overrides.yaml"
        overrides.write_text(overrides.read_text().replace("0.2", "0.1"))
    _, lines = _write_report(tmp_path)
    assert len(lines) == 4 and sum("torch=3.x" in line for line in lines) == 2
    assert (tmp_path / "gain_vs_loss.T.png").is_file()  # a line per torch version


def test_a_sweep_written_with_the_old_acc_column_names_reads_as_today(tmp_path):
    """Before December 2026 the metric columns were named acc, val_acc_best, ...:
    kdrun-report reads such a sweep and writes its summary.csv with today's names."""
    fake_job(tmp_path, "a", ["loss.T=2"], "t0", {0: (50.0, 51.0), 1: (50.0, 52.5)}, T=2.0)
    job = tmp_path / "a"
    old = {"val_metric_best": "val_acc_best", "test_metric_best_val": "test_acc_best_val"}
    pd.read_csv(job / "summary.csv").rename(columns=old).to_csv(job / "summary.csv",
                                                                index=False)
    pd.read_csv(job / "metrics.csv").rename(columns={"score": "acc"}).to_csv(
        job / "metrics.csv", index=False)
    _, rows = report_table(tmp_path)
    assert rows[0]["gain"].split()[0] == "+1.75"
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert {"val_metric_best", "test_metric_best_val"} <= set(summary.columns)
    assert not {"val_acc_best", "test_acc_best_val", "acc"} & set(summary.columns)


def test_a_distilled_student_without_its_scratch_twin_is_never_a_gain(tmp_path):
    """The gain is paired by job and seed, as the run's table pairs it by seed (one
    function, kdrun/report/statistics.py: paired_gain): a row without its twin stops the
    report instead of becoming a number."""
    fake_job(tmp_path, "a", ["loss.T=2"], "t0", {0: (50.0, 51.0), 1: (50.0, 52.5)}, T=2.0)
    summary = pd.read_csv(tmp_path / "a" / "summary.csv")
    summary.loc[(summary.role == "scratch") & (summary.seed == 1), "seed"] = 7
    summary.to_csv(tmp_path / "a" / "summary.csv", index=False)
    with pytest.raises(RuntimeError, match=r"not paired on \['job', 'seed'"):
        write_report(tmp_path)
