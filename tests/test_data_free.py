"""Data-free distillation (scheme=data_free): each loss term against an independent
computation in float64, the generator's output for images, sequences and vectors, a
resumed stage bit-identical to an uninterrupted one, a collapse or divergence ending the
stage in one line, and runs end to end: the data-free row with "examples seen: 0", its
verdict, samples pictures, reuse, a sweep over a generator knob that trains the teacher
once, and a label budget whose teacher learns from every label."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import entropy
from torch import nn

from kdrun.data import Data, Split
from kdrun.errors import TrainingDiverged
from kdrun.losses.data_free import (
    BatchNormPrior,
    activation_loss,
    bn_statistics_loss,
    information_entropy_loss,
    kl_discrepancy,
    l1_discrepancy,
    one_hot_loss,
)
from kdrun.models.generator import Generator, sample_spread
from kdrun.train.data_free import DataFreeGame, DataFreeSettings, fit_data_free
from tests.helpers import KDRUN, fit_or_snapshot, make_config

SHAPE, CLASSES = (1, 40), 10
rng = np.random.default_rng(0)
S, T = rng.normal(size=(6, CLASSES)) * 3, rng.normal(size=(6, CLASSES)) * 3


def torch64(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_the_discrepancies_match_a_direct_computation():
    assert l1_discrepancy(torch64(S), torch64(T)).item() == pytest.approx(
        np.abs(S - T).sum() / S.size, rel=1e-12)
    p, q = softmax(T), softmax(S)
    kl = sum(entropy(p[i], q[i]) for i in range(len(p))) / len(p)  # scipy: sum p log(p/q)
    assert kl_discrepancy(torch64(S), torch64(T)).item() == pytest.approx(kl, rel=1e-10)


def test_dafls_terms_match_a_direct_computation():
    p = softmax(T)
    top = T.argmax(1)
    assert one_hot_loss(torch64(T)).item() == pytest.approx(
        -np.mean(np.log(p[np.arange(len(T)), top])), rel=1e-12)
    features = rng.normal(size=(6, 16))
    assert activation_loss(torch64(features)).item() == pytest.approx(
        -np.abs(features).sum() / features.size, rel=1e-12)
    assert information_entropy_loss(torch64(T)).item() == pytest.approx(
        -entropy(p.mean(0), base=10), rel=1e-10)


def numpy_bn_term(x: np.ndarray, running_mean: np.ndarray, running_var: np.ndarray) -> float:
    per_channel = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    return (np.sqrt(((running_var - per_channel.var(1)) ** 2).sum())
            + np.sqrt(((running_mean - per_channel.mean(1)) ** 2).sum()))


def test_the_batch_norm_prior_sums_deepinversions_term_over_the_teachers_layers():
    torch.manual_seed(0)
    conv, bn2, flat, bn1 = (nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Flatten(),
                            nn.BatchNorm1d(3 * 4 * 4))
    teacher = nn.Sequential(conv, bn2, nn.ReLU(), flat, bn1, nn.Linear(48, 5)).double()
    for bn in (bn2, bn1):  # statistics of some other data, as a trained teacher's are
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    teacher.eval()
    x = torch.randn(7, 2, 4, 4, dtype=torch.float64)
    prior = BatchNormPrior(teacher)
    prior.clear()
    teacher(x)
    ours = prior.loss().item()
    with torch.no_grad():  # the layers' inputs, computed by hand
        first = conv(x)
        second = flat(torch.relu(bn2(first)))
    expected = sum(numpy_bn_term(inputs.numpy(), bn.running_mean.numpy(), bn.running_var.numpy())
                   for inputs, bn in ((first, bn2), (second, bn1)))
    assert ours == pytest.approx(expected, rel=1e-10)
    assert bn_statistics_loss(first, bn2.running_mean, bn2.running_var).item() == pytest.approx(
        numpy_bn_term(first.detach().numpy(), bn2.running_mean.numpy(),
                      bn2.running_var.numpy()), rel=1e-10)
    prior.remove()


def test_the_generators_loss_is_the_weighted_sum_its_settings_name():
    s, t, f = torch64(S), torch64(T), torch64(rng.normal(size=(6, 16)))

    class Prior:
        def loss(self):
            return torch.tensor(0.7, dtype=torch.float64)

    adversarial = DataFreeGame(DataFreeSettings(bn_prior=2.0), SHAPE)
    assert adversarial.generator_loss(s, t, None, Prior()).item() == pytest.approx(
        -l1_discrepancy(s, t).item() + 2.0 * 0.7, rel=1e-12)
    dafl = DataFreeGame(DataFreeSettings(generator_loss="dafl", discrepancy="kl"), SHAPE)
    assert dafl.generator_loss(s, t, f, None).item() == pytest.approx(
        1.0 * one_hot_loss(t).item() + 0.1 * activation_loss(f).item()
        + 5.0 * information_entropy_loss(t).item(), rel=1e-12)
    assert dafl(s, t).item() == pytest.approx(kl_discrepancy(s, t).item(), rel=1e-12)


@pytest.mark.parametrize("shape", [(1, 40), (1, 8, 8), (3, 32, 32), (1, 28, 28), (64,)])
def test_the_generator_makes_standardised_inputs_of_the_datas_shape(shape):
    torch.manual_seed(0)
    x = Generator(shape, z_dim=16, width=8)(torch.randn(32, 16)).detach()
    assert x.shape == (32, *shape)
    per_channel = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    assert per_channel.mean(1).abs().max() < 1e-5  # the last batch norm, in training mode
    assert (per_channel.var(1, unbiased=False) - 1).abs().max() < 1e-3  # eps = 1e-5


def test_sample_spread_is_zero_for_copies_and_about_one_for_independent_samples():
    torch.manual_seed(0)
    assert sample_spread(torch.randn(1, 40).expand(64, 40)) == 0.0
    assert 0.95 < sample_spread(torch.randn(512, 40)) <= 1.0


def small_setup(**settings):
    """A trained-looking teacher, a student, the MNIST-1D-shaped test split, in float64."""
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(40, 32), nn.BatchNorm1d(32), nn.ReLU(),
                            nn.Linear(32, CLASSES)).double()
    teacher[2].running_var.fill_(2.0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, CLASSES))
    x = torch.randn(50, *SHAPE)
    test = Split(x, torch.randint(0, CLASSES, (50,)))
    empty = Split(x[:0], test.y[:0])
    data = Data("toy", empty, empty, test, CLASSES)
    tcfg = make_config("trainer.float64=true", "trainer.batch_size=16").trainer
    game = DataFreeGame(DataFreeSettings(z_dim=8, width=4, batch_size=16, iterations=3,
                                         student_steps=2, samples_every=2, **settings), SHAPE)
    return teacher, student, data, tcfg, game


class Teacher:
    def __init__(self, model):
        self.model = model


def fit_small(epochs: int, resume=None, stop_at=None, **settings):
    """fit_data_free on the small setup: (student, game, result), or the snapshot of the
    epoch ``stop_at`` (what a kill then leaves)."""
    teacher, student, data, tcfg, game = small_setup(**settings)
    result = fit_or_snapshot(student, data, game, tcfg, stage="distilled", epochs=epochs,
                             resume=resume, stop_at=stop_at, fit_with=fit_data_free,
                             teacher=Teacher(teacher))
    return result if stop_at is not None else (student, game, result)


@pytest.mark.parametrize("generator_loss", ["adversarial", "dafl"])
def test_a_resumed_data_free_stage_ends_bit_identical_to_an_uninterrupted_one(generator_loss):
    settings = {"generator_loss": generator_loss, "bn_prior": 0.5}
    student, game, result = fit_small(3, **settings)
    state = fit_small(3, stop_at=1, **settings)
    torch.save(state, buffer := __import__("io").BytesIO())  # what is written to disk
    buffer.seek(0)
    resumed_student, resumed_game, resumed = fit_small(3, resume=torch.load(buffer),
                                                       **settings)
    for ours, theirs in ((student, resumed_student), (game, resumed_game)):
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            if torch.is_tensor(a):
                assert torch.equal(a, b), name
    assert [torch.equal(a, b) for a, b in zip(game.samples, resumed_game.samples)] == [True] * 4
    assert game.sample_steps == resumed_game.sample_steps == [2, 4, 6, 8]
    assert result.test_metric_last == resumed.test_metric_last
    assert result.best_epoch == 3 and math.isnan(result.val_metric_best)  # no validation read
    assert result.generated == 3 * 3 * (2 + 1) * 16


def test_a_collapsed_generator_ends_the_stage_with_one_line():
    with pytest.raises(TrainingDiverged) as error:
        fit_small(2, collapse_below=1.0)  # samples never spread as much as independent ones
    assert "the generator collapsed" in str(error.value)
    assert "scheme.collapse_below" in str(error.value) and "\n" not in str(error.value)


def test_a_generator_gone_nan_ends_the_stage_or_its_steps_are_skipped(monkeypatch):
    def nan_forward(self, z):
        return torch.full((len(z), *SHAPE), math.nan, dtype=z.dtype)

    monkeypatch.setattr(Generator, "forward", nan_forward)
    with pytest.raises(TrainingDiverged, match="the student's loss became NaN or infinite"):
        fit_small(1)


# ---------------------------------------------------------------- end to end

FAST = ["progress=false", "num_threads=1", "trainer.epochs=2", "repeats=2",
        "dataset.unlabeled=0", "scheme=data_free", "scheme.iterations=3", "scheme.batch_size=64",
        "scheme.width=8", "scheme.student_steps=2", "scheme.samples_every=2",
        "latency.repeats_b1=4", "latency.repeats_b256=4", "latency.warmup=0"]


def kdrun(tmp_path: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([KDRUN, *FAST, f"output_root={tmp_path}", *overrides],
                         capture_output=True, text=True, timeout=600)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def run_dirs(tmp_path: Path) -> list[Path]:
    return sorted(p.parent for p in tmp_path.glob("**/summary.csv") if "multirun" not in p.parts
                  or p.parent.name != p.parents[1].name)


def test_a_data_free_run_shows_its_row_with_no_example_seen_and_its_verdict(tmp_path):
    from kdrun.run import pipeline

    cfg = make_config(*FAST, f"output_root={tmp_path}", f"cache.dir={tmp_path}/cache")
    run = tmp_path / "run"
    table = pipeline.run(cfg, run)["table"]  # what the command prints (the CLI: test_cli.py)
    assert "data-free  mlp[100,100]" in table
    assert "examples seen by the data-free student: 0" in table
    assert "gain (best val): 95% CI" in table and "data-free-scratch" in table
    summary = pd.read_csv(run / "summary.csv")
    free = summary[summary.role == "distilled"]
    assert (free[["train_labeled", "train_unlabeled", "val_examples"]] == 0).all().all()
    assert (free.train_generated == 2 * 3 * 3 * 64).all()
    assert (free.selected_by == "last epoch (data-free)").all()
    assert (free.best_epoch == 2).all()
    metrics = pd.read_csv(run / "metrics.csv")
    assert set(metrics[metrics.stage == "distilled"].split) == {"train", "generator", "test"}
    for seed in (0, 1):
        assert (run / f"samples_seed{seed}.png").stat().st_size > 1000


@pytest.mark.slow  # two runs
def test_a_second_data_free_run_reuses_every_stage(tmp_path):
    kdrun(tmp_path)
    again = kdrun(tmp_path, "scheme.samples_every=3")  # the picture only: not in the key
    second = max(tmp_path.glob("runs/*/*"))
    events = [json.loads(line) for line in (second / "events.jsonl").read_text().splitlines()]
    assert {e["event"] for e in events} == {"reused"}, events
    assert (second / "samples_seed1.png").exists()  # drawn from the stage's checkpoint
    assert again.stdout.count("data-free  ") == 1


@pytest.mark.slow  # a sweep of two jobs
def test_a_sweep_over_a_generator_knob_trains_the_teacher_once(tmp_path):
    out = subprocess.run([KDRUN, "-m", *FAST, f"output_root={tmp_path}", "repeats=1",
                          "scheme.generator_lr=0.001,0.002"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    events = [json.loads(line) for path in tmp_path.glob("multirun/*/*/*/events.jsonl")
              for line in path.read_text().splitlines()]
    trained = [e["stage"] for e in events if e["event"] == "trained"]
    # the teacher may be trained by the batched launcher before both jobs reuse it
    assert sorted(trained) in (["distilled", "distilled", "scratch"],
                               ["distilled", "distilled", "scratch", "teacher"]), events
    summaries = pd.concat(pd.read_csv(p) for p in tmp_path.glob("multirun/*/*/*/summary.csv"))
    keys = summaries.groupby("role").cache_key.nunique()
    assert (keys["teacher"], keys["scratch"], keys["distilled"]) == (1, 1, 2)
    report = next(tmp_path.glob("multirun/*/*/report.md")).read_text()
    assert "| scheme.generator_lr |" in report and "data-free students, which read no " \
        "validation example): no setting is selected" in report


@pytest.mark.slow  # a run of its own
def test_a_label_budget_gives_the_teacher_every_label_and_the_scratch_student_the_budget(
        tmp_path):
    out = kdrun(tmp_path, "split.labeled=100", "repeats=1")
    summary = pd.read_csv(next(tmp_path.glob("runs/*/*/summary.csv")))
    rows = summary.set_index("role")
    assert rows.train_labeled["scratch"] == 90  # the budget, less its validation share
    assert rows.train_labeled["teacher"] == 4000 - 10  # all but the validation examples
    assert rows.train_labeled["distilled"] == 0
    assert "teacher 3,990 labelled" in out.stdout and "scratch 90 labelled" in out.stdout


@pytest.mark.slow  # two runs that stop after loading the data
def test_what_data_free_cannot_run_with_is_refused_in_one_line(tmp_path):
    out = kdrun(tmp_path, "scheme.bn_prior=1", check=False)  # the default teacher has none
    assert out.returncode == 2
    assert "scheme.bn_prior=1.0 is invalid: needs a teacher with batch norm" in out.stderr
    assert "Traceback" not in out.stderr
    out = kdrun(tmp_path, "scheme.discrepancy=l2", check=False)
    assert out.returncode == 2 and "scheme.discrepancy" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow  # trains the teacher and a scratch student first
def test_a_run_whose_generator_collapses_stops_in_one_line(tmp_path):
    collapsed = kdrun(tmp_path, "scheme.collapse_below=1", check=False)
    assert collapsed.returncode != 0 and "the generator collapsed" in collapsed.stderr
    assert "Traceback" not in collapsed.stderr


@pytest.mark.slow  # three runs of the pipeline
def test_a_killed_data_free_stage_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    from kdrun.run import pipeline, stages
    from kdrun.store.files import load_checkpoint

    overrides = [o for o in FAST if not o.startswith("latency")] + ["trainer.epochs=3",
                                                                     "repeats=1"]

    def run(name: str) -> Path:
        cfg = make_config(*overrides, f"cache.dir={tmp_path}/{name}/cache")
        pipeline.run(cfg, tmp_path / name / "run")
        return tmp_path / name / "run"

    real = stages.fit_data_free

    def killed_after_epoch_2(*args, on_epoch, **kwargs):
        def then_kill(rows, snapshot):
            on_epoch(rows, snapshot)  # epoch 2's state is saved: what a kill then leaves
            if rows[0]["epoch"] == 2:
                raise KeyboardInterrupt
        return real(*args, on_epoch=then_kill, **kwargs)

    monkeypatch.setattr(stages, "fit_data_free", killed_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run("cut")
    monkeypatch.undo()
    resumed, whole = run("cut"), run("whole")
    events = [json.loads(line) for line in (resumed / "events.jsonl").read_text().splitlines()]
    assert {"event": "resumed", "stage": "distilled", "from_epoch": 2}.items() <= \
        [e for e in events if e["stage"] == "distilled"][0].items()
    ours, theirs = (load_checkpoint(run / "checkpoints" / "distilled.pt") for run in
                    (resumed, whole))
    for part in ("model", "loss_state"):  # the student, and the generator with its samples
        for name, value in theirs[part].items():
            if torch.is_tensor(value):
                assert torch.equal(ours[part][name], value), name
    kept = ours["loss_state"]["_extra_state"]
    assert kept["sample_steps"] == theirs["loss_state"]["_extra_state"]["sample_steps"] == \
        [2, 4, 6, 8]
    assert all(torch.equal(a, b) for a, b in zip(kept["samples"],
                                                 theirs["loss_state"]["_extra_state"]["samples"]))
