"""scheme=lifelong: the task sequence, the LwF loss against its formula, the accuracy
matrix's figures against hand computation, and the pipeline: its table, its cache and a
kill in mid-sequence."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from kdrun.data.labels import UNLABELED
from kdrun.data.tasks import masked_accuracy, task_sequence
from kdrun.errors import ConfigError, UserError
from kdrun.losses import build_loss
from kdrun.losses.lifelong import TaskLoss
from kdrun.report.lifelong import average_accuracy, backward_transfer, forgetting
from tests.helpers import QUICK_LATENCY, make_config, run_events

TINY = ["scheme=lifelong", "scheme.tasks=3", "progress=false", "num_threads=1",
        "trainer.epochs=2", "repeats=2", "split.max_train=600", "split.max_test=300",
        *QUICK_LATENCY]


def test_the_figures_of_an_accuracy_matrix_match_hand_computation():
    nan = math.nan
    R = np.array([[90.0, nan, nan],
                  [60.0, 80.0, nan],
                  [70.0, 40.0, 100.0]])
    assert average_accuracy(R) == pytest.approx((70 + 40 + 100) / 3)
    # BWT: (R[3,1] - R[1,1] + R[3,2] - R[2,2]) / 2 = (-20 - 40) / 2
    assert backward_transfer(R) == pytest.approx(-30.0)
    # forgetting: task 1 peaked at 90 (after task 1), task 2 at 80: (20 + 40) / 2
    assert forgetting(R) == pytest.approx(30.0)
    R[1, 0] = 95.0  # task 1 peaked after task 2: forgetting counts from its best
    assert forgetting(R) == pytest.approx((25 + 40) / 2)
    assert backward_transfer(R) == pytest.approx(-30.0)  # BWT counts from when it was learnt


def test_tasks_cut_the_class_order_and_say_what_a_prediction_may_choose():
    sequence = task_sequence(5, 2, [4, 3, 2, 1, 0], "task")
    assert sequence.classes == ((4, 3, 2), (1, 0))  # the first tasks take the spare class
    task = sequence.choices(1)
    assert task[1].nonzero().flatten().tolist() == [0, 1]  # its own task's classes
    assert task[3].nonzero().flatten().tolist() == [2, 3, 4]
    assert sequence.old_groups(1) == [[4, 3, 2]]
    seen = task_sequence(5, 2, None, "class")
    assert seen.choices(0)[1].nonzero().flatten().tolist() == [0, 1, 2]  # classes seen so far
    assert seen.choices(1)[1].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    assert task_sequence(6, 3, None, "class").old_groups(2) == [[0, 1, 2, 3]]  # one group
    assert task_sequence(6, 3, None, "task").old_groups(2) == [[0, 1], [2, 3]]


def test_masked_accuracy_picks_among_the_allowed_classes_only():
    sequence = task_sequence(4, 2, None, "task")
    logits = torch.tensor([[0.0, 1.0, 5.0, 0.0],   # class 1: 2 is larger, but not its task's
                           [0.0, 0.0, 1.0, 3.0]])  # class 2: 3 is its task's and larger
    labels = torch.tensor([1, 2])
    assert masked_accuracy(sequence.choices(1)).compute(logits, labels) == 50.0
    assert masked_accuracy(task_sequence(4, 2, None, "class").choices(1)).compute(
        logits, labels) == 0.0


@pytest.mark.parametrize(("order", "tasks", "key"), [([0, 1, 2], 2, "scheme.class_order"),
                                                     ([0, 0, 1, 2], 2, "scheme.class_order"),
                                                     (None, 5, "scheme.tasks")])
def test_a_bad_class_order_or_task_count_is_one_line_naming_its_key(order, tasks, key):
    with pytest.raises(ConfigError, match=key):
        task_sequence(4, tasks, order, "task")


def test_the_lwf_loss_is_its_formula_in_float64():
    torch.manual_seed(0)
    sequence = task_sequence(6, 3, None, "task")
    s = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 6, dtype=torch.float64)
    y = torch.tensor([4, 5, 4, 4, 5])
    keep = build_loss({"name": "kd", "T": 2.0, "alpha": 0.75})
    loss = TaskLoss(sequence.choices(2), sequence.old_groups(2), keep, ce_weight=0.25)
    value = loss(s, t, y)
    hard = F.cross_entropy(s[:, 4:], y - 4)  # task incremental: its task's two classes

    def kl(g):  # 0.75 * T^2 * KL(softmax(t_g / 2) || softmax(s_g / 2)), batch mean
        p, log_q = F.softmax(t[:, g] / 2, 1), F.log_softmax(s[:, g] / 2, 1)
        return 0.75 * 4 * (p * (p.log() - log_q)).sum(1).mean()
    expected = 0.25 * hard + (kl([0, 1]) + kl([2, 3])) / 2
    assert abs(value.item() - expected.item()) < 1e-12  # float64: rounding ~1e-16 per term
    value.backward()
    assert torch.isfinite(s.grad).all()  # the kept loss's empty hard term adds nothing
    assert keep.all_labelled is False and (torch.full_like(y, UNLABELED) == UNLABELED).all()


def test_a_loss_that_keeps_no_outputs_or_features_is_refused_in_one_line():
    from kdrun.run.validate import validate

    for override in ("loss=ce", "loss=fitnet"):
        with pytest.raises(UserError, match="loss.name"):
            validate(make_config(*TINY, override))


def lifelong_run(tmp_path, name: str, *overrides: str, cache: str | None = None) -> dict:
    from kdrun.run import pipeline

    cfg = make_config(*TINY, *overrides, f"cache.dir={tmp_path}/{cache or name}-cache")
    return pipeline.run(cfg, tmp_path / name)


def test_a_lifelong_run_prints_its_table_writes_its_heatmap_and_reuses_every_stage(tmp_path):
    result = lifelong_run(tmp_path, "a")
    rows = pd.DataFrame(result["rows"])
    # per seed: the first task, then fine-tune, LwF and joint on each later task
    assert sorted(rows.role) == sorted(
        ["task1", "finetune_task2", "lwf_task2", "joint_task2", "finetune_task3",
         "lwf_task3", "joint_task3"] * 2)
    last = rows[rows.role == "lwf_task3"]
    assert last[["acc_task1", "acc_task2", "acc_task3"]].notna().all().all()
    for line in ("after task3", "fine-tune", "LwF", "joint (upper bound)", "ACC (avg acc)",
                 "forgetting", "LwF - fine-tune ACC"):
        assert line in result["table"], line
    assert (tmp_path / "a" / "lifelong.png").stat().st_size > 0
    joint = rows[rows.role == "joint_task3"]
    assert (joint.train_labeled.iloc[0] > last.train_labeled.iloc[0])  # it keeps every task's
    lifelong_run(tmp_path, "b", cache="a")
    assert {e["event"] for e in run_events(tmp_path / "b")} == {"reused"}


@pytest.mark.slow  # three runs of the pipeline (~30 s)
def test_a_run_killed_mid_sequence_resumes_to_the_uninterrupted_numbers(tmp_path, monkeypatch):
    from kdrun.run import stage

    real = stage.fit

    def killed_in_lwf_task3(model, data, loss, tcfg, *, stage, on_epoch, **kwargs):
        def then_kill(rows, snapshot):
            on_epoch(rows, snapshot)
            if stage == "lwf_task3" and rows[0]["epoch"] == 1:
                raise KeyboardInterrupt
        return real(model, data, loss, tcfg, stage=stage, on_epoch=then_kill, **kwargs)

    monkeypatch.setattr(stage, "fit", killed_in_lwf_task3)
    with pytest.raises(KeyboardInterrupt):
        lifelong_run(tmp_path, "cut", "repeats=1")
    monkeypatch.undo()
    resumed = lifelong_run(tmp_path, "cut", "repeats=1")
    events = run_events(tmp_path / "cut")
    assert {"event": "resumed", "stage": "lwf_task3", "from_epoch": 1}.items() <= \
        next(e for e in events if e["event"] == "resumed").items()
    whole = lifelong_run(tmp_path, "whole", "repeats=1")
    columns = ["role", "acc_task1", "acc_task2", "acc_task3"]
    pd.testing.assert_frame_equal(pd.DataFrame(resumed["rows"])[columns],
                                  pd.DataFrame(whole["rows"])[columns])


@pytest.mark.slow  # a 2-job sweep (~20 s)
def test_a_sweep_over_T_retrains_only_lwf_and_writes_a_report(tmp_path):
    import subprocess

    from tests.helpers import KDRUN

    proc = subprocess.run([KDRUN, "-m", *TINY, "scheme.tasks=2", "loss.T=2,4",
                           f"hydra.sweep.dir={tmp_path}/sweep", f"cache.dir={tmp_path}/cache"],
                          cwd=tmp_path, text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no gain is pooled" in (tmp_path / "sweep" / "report.md").read_text()
    trained = [e["stage"] for job in (tmp_path / "sweep").glob("loss.T=*")
               for e in run_events(job) if e["event"] == "trained"]
    # the first task, fine-tuning and joint training do not depend on T: trained once a seed
    assert sorted(trained) == sorted(["task1", "finetune_task2", "joint_task2"] * 2
                                     + ["lwf_task2"] * 4)
