"""Schemes and task metrics declare what they are, as losses do: the pipeline, the table,
the verdict and the reports ask them, and never switch on a name."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import torch

from kdrun.data.metrics import Metric
from kdrun.data.synthetic import synthetic
from kdrun.report.statistics import gain_test
from kdrun.run import pipeline
from kdrun.run.schemes import SCHEMES, scheme_of
from tests.helpers import make_config

KDRUN = Path(__file__).resolve().parents[1] / "kdrun"
TINY = ["dataset=synthetic", "dataset.n=300", "dataset.dim=10", "teacher=mlp",
        "teacher.hidden=[16]", "student=mlp", "student.hidden=[8]", "trainer.epochs=3",
        "repeats=2", "progress=false", "num_threads=1"]


def test_no_code_outside_the_scheme_and_model_modules_switches_on_their_names():
    for path in KDRUN.rglob("*.py"):
        text = path.read_text()
        if "schemes" not in path.parts:
            assert not re.search(r"scheme\.name\s*(==|!=|in |not in )", text), path
        if "models" not in path.parts:
            assert not re.search(r"\.arch\s*(==|!=|in |not in )", text), path


def test_every_scheme_makes_the_rows_it_declares(tmp_path):
    from tests.test_language_models import TINY_LM

    overrides = {"offline": TINY, "born_again": [*TINY, "scheme.generations=2"], "dml": TINY,
                 "ensemble": [*TINY, "scheme.teachers=[{option: mlp, hidden: [8]},"
                                     "{option: mlp}]"],
                 "sequence_kd": [*TINY_LM, "scheme.samples=8"],  # language models' schemes
                 "on_policy": [*TINY_LM, "scheme.prompt=12", "dataset.sentences=100"],
                 "data_free": [*TINY, "scheme.iterations=2", "scheme.batch_size=16",
                               "scheme.width=4", "scheme.student_steps=1"],  # flat inputs
                 "lifelong": [*TINY, "scheme.tasks=2"]}  # task1, then each learner's task2
    assert set(overrides) == set(SCHEMES.names())
    for name, extra in overrides.items():
        cfg = make_config(*extra, f"scheme={name}", f"cache.dir={tmp_path}/cache")
        scheme = scheme_of(cfg)
        rows = pipeline.run(cfg, tmp_path / name)["rows"]
        roles = [row["role"] for row in rows]
        assert set(roles) == set(scheme.roles), name  # teacherN / generationN: as declared
        assert ("teacher" in roles) == scheme.has_teacher, name


def error_rate(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return 100 - (logits.argmax(-1) == labels).float().mean(-1) * 100


ERROR = Metric("error rate", "err", "%", higher_is_better=False, score=error_rate)


def synthetic_by_error(**keys):
    """The synthetic set, judged by its error rate: a metric where lower is better."""
    raw = synthetic(**keys)
    raw.metric = ERROR
    return raw


def test_a_metric_where_lower_is_better_selects_and_judges_by_it(tmp_path):
    cfg = make_config(*TINY, "trainer.epochs=6", "trainer.lr=0.05",
                      "dataset.name=tests.test_declarations.synthetic_by_error")
    result = pipeline.run(cfg, tmp_path / "run")
    summary = pd.DataFrame(result["rows"])
    assert (summary.metric == "error rate").all()
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    for row in summary.itertuples():  # the best epoch: the lowest validation error
        val = metrics[(metrics.stage == row.role) & (metrics.seed == row.seed)
                      & (metrics.split == "val")].set_index("epoch").score
        assert row.best_epoch == val.idxmin() and row.val_metric_best == val.min()
    assert "test err, last" in result["table"] and "error rate" not in result["table"][:80]
    # a negative gain in error is distillation helping
    assert gain_test([-2.0, -3.0, -2.5], ERROR).verdict == "helps"
    assert gain_test([-2.0, -3.0, -2.5]).verdict == "hurts"  # accuracy: lower is worse


def test_a_sweep_report_reads_the_metric_and_its_direction_back_from_the_summaries(tmp_path):
    from tests.test_sweep_report import fake_job, report_table

    for i, alpha in enumerate((0.5, 0.9)):  # error rates: distillation lowers them
        fake_job(tmp_path, f"j{i}", [f"loss.alpha={alpha}"], "t",
                 {0: (30.0, 25.0 - i), 1: (31.0, 26.5 - i), 2: (29.0, 24.0 - i)})
        path = tmp_path / f"j{i}" / "summary.csv"
        pd.read_csv(path).assign(metric="a metric of my own", higher_is_better=False).to_csv(
            path, index=False)
    text, rows = report_table(tmp_path)
    assert [r["verdict"] for r in rows] == ["helps", "helps"]
    # the best setting: the lowest validation value, alpha=0.9
    assert "selected on validation a metric of my own" in text
    assert "**loss.alpha=0.9**" in text
