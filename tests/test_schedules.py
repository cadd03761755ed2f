"""Per-step learning-rate schedules and gradient accumulation, written once for every
training loop (kdrun/train/epochs.py OptimizerSteps, kdrun/train/optim.py).

The rates are checked against a hand computation of the formula at given steps; one
optimiser step over k accumulated batches against one batch k times larger, both in
float64 (the bound: tests/helpers.py FLOAT64_WEIGHT_BOUND)."""

from __future__ import annotations

import math

import pytest
import torch

from kdrun.data import load_data
from kdrun.errors import ConfigError
from kdrun.losses import CE, KD
from kdrun.models import build_model
from kdrun.run.validate import validate
from kdrun.train.fit import fit
from tests.helpers import assert_float64_weights_agree, make_config

DATA = ["dataset=synthetic", "dataset.n=375", "dataset.dim=10", "student=mlp",
        "student.hidden=[16]", "split.val_fraction=0.1"]  # 270 training examples


def rates_of_each_step(monkeypatch, *overrides: str, epochs: int = 2) -> list[float]:
    """The learning rate of every optimiser step of a fit() under ``overrides``."""
    seen = []
    step = torch.optim.Adam.step

    def recording(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.Adam, "step", recording)
    cfg = make_config(*DATA, "trainer.fused_optimizer=false", *overrides)
    data = load_data(cfg.dataset, cfg.split)
    model = build_model(cfg.student, data.input_shape, data.num_classes)
    fit(model, data, CE(), cfg.trainer, stage="scratch", epochs=epochs, seed=0,
        device=torch.device("cpu"), progress=False)
    return seen


def test_warmup_then_cosine_per_step_equals_a_hand_computation(monkeypatch):
    # 270 examples in batches of 54: 5 steps an epoch, 10 in 2 epochs; warm-up 3 steps
    rates = rates_of_each_step(monkeypatch, "trainer.batch_size=54", "trainer.lr=0.01",
                               "trainer.schedule=cosine", "trainer.schedule_unit=step",
                               "trainer.warmup_steps=3", "trainer.min_lr=0.001")
    # steps 1-3: 0.01 x k/3; steps 4-10: from 0.01 down half a cosine to 0.001, the
    # angle pi x (step - 4) / 6
    by_hand = [0.01 / 3, 0.02 / 3, 0.01] + [
        0.001 + 0.009 * (1 + math.cos(math.pi * (s - 4) / 6)) / 2 for s in range(4, 11)]
    assert rates == pytest.approx(by_hand, rel=1e-12)
    assert rates[3] == pytest.approx(0.01) and rates[6] == pytest.approx(0.0055)  # halfway
    assert rates[9] == pytest.approx(0.001)  # the last step at min_lr


def test_linear_per_step_and_a_warmup_share(monkeypatch):
    rates = rates_of_each_step(monkeypatch, "trainer.batch_size=54", "trainer.lr=0.01",
                               "trainer.schedule=linear", "trainer.schedule_unit=step",
                               "trainer.warmup_steps=0.3")  # 0.3 of 10 steps: 3
    assert rates[:3] == pytest.approx([0.01 / 3, 0.02 / 3, 0.01])
    assert rates[3:] == pytest.approx([0.01 * (1 - k / 6) for k in range(7)])  # down to 0


def test_per_epoch_schedules_step_once_an_epoch(monkeypatch):
    rates = rates_of_each_step(monkeypatch, "trainer.batch_size=54", "trainer.lr=0.01",
                               "trainer.schedule=cosine", epochs=3)
    # torch's CosineAnnealingLR over 3 epochs: 0.01, 0.01 x (1 + cos(pi/3))/2, ...
    assert rates == pytest.approx([0.01] * 5 + [0.0075] * 5 + [0.0025] * 5)


def test_accumulated_batches_count_as_one_optimiser_step(monkeypatch):
    # 270 examples in batches of 20: 14 batches an epoch (the last of 10); by 3: 4 steps
    # of 3 batches and one of the last 2, each schedule step one optimiser step
    rates = rates_of_each_step(monkeypatch, "trainer.batch_size=20", "trainer.accumulate=3",
                               "trainer.schedule=linear", "trainer.schedule_unit=step")
    assert len(rates) == 2 * 5 and rates[0] == pytest.approx(0.01)
    assert rates[-1] == pytest.approx(0.0)


def trained(*overrides: str, loss=None):
    cfg = make_config(*DATA, "trainer.float64=true", "trainer.schedule_unit=step",
                      "trainer.warmup_steps=2", "trainer.grad_clip=0.5", *overrides)
    data = load_data(cfg.dataset, cfg.split)
    torch.manual_seed(0)
    model = build_model(cfg.student, data.input_shape, data.num_classes)
    teacher = None
    if loss is not None:
        from kdrun.train.targets import CachedLogits

        torch.manual_seed(1)
        teacher = CachedLogits(torch.randn(len(data.train), data.num_classes,
                                           dtype=torch.float64) * 3)
    return fit(model, data, loss or CE(), cfg.trainer, stage="scratch", epochs=2, seed=0,
               device=torch.device("cpu"), teacher=teacher, progress=False)


@pytest.mark.parametrize("loss", [None, KD(T=4.0, alpha=0.9)], ids=["ce", "kd"])
def test_k_accumulated_batches_equal_one_batch_k_times_larger_in_float64(loss):
    # 270 examples: batches of 20 by 3 (the last group 20 + 10 rows) against batches of
    # 60 (the last 30): the same gradients, the same clipped steps, the same schedule
    small = trained("trainer.batch_size=20", "trainer.accumulate=3", loss=loss)
    large = trained("trainer.batch_size=60", loss=loss)
    assert_float64_weights_agree(small.best_state, large.best_state, "accumulate 3 x 20")
    other = trained("trainer.batch_size=20", loss=loss)  # a real difference is seen
    difference = max(float((a - b).abs().max()) for a, b in
                     zip(other.best_state.values(), large.best_state.values()))
    assert difference > 1e-3


def test_a_stacked_group_accumulates_as_each_member_alone():
    from tests.test_batched import FLOAT64, assert_each_ends_as_alone, grid_members

    cfg = make_config("split.max_train=600", FLOAT64, "trainer.batch_size=40",
                      "trainer.accumulate=2", "trainer.schedule_unit=step",
                      "trainer.warmup_steps=3")
    data = load_data(cfg.dataset, cfg.split)
    torch.manual_seed(123)
    teacher_logits = torch.randn(len(data.train), data.num_classes) * 3
    assert_each_ends_as_alone(grid_members(cfg, data, teacher_logits)[:3], data, cfg.trainer, 2)


@pytest.mark.parametrize("overrides, words", [
    (["trainer.schedule_unit=step", "trainer.schedule=multistep"],
     "trainer.schedule='multistep' is invalid: with trainer.schedule_unit=step: cosine, linear"),
    (["trainer.min_lr=0.02"], "trainer.min_lr=0.02 is invalid: must be below trainer.lr=0.01"),
    (["trainer.warmup_steps=2.5"], "trainer.warmup_steps=2.5 is invalid: must be 0, a share"),
    (["trainer.accumulate=0"], "trainer.accumulate=0 is invalid"),
    (["scheme=data_free", "trainer.accumulate=2"],
     "trainer.accumulate=2 is invalid: must be 1 with scheme=data_free"),
])
def test_step_settings_that_cannot_work_are_one_line(overrides, words):
    with pytest.raises(ConfigError) as error:
        validate(make_config(*overrides))
    assert words in str(error.value)


def test_adams_betas_are_a_setting():
    from kdrun.train.optim import make_optimizer

    cfg = make_config("trainer.optimizer=adamw", "trainer.betas=[0.9,0.99]")
    validate(cfg)
    optimizer = make_optimizer([torch.zeros(2, requires_grad=True)], cfg.trainer,
                               torch.device("cpu"))
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    with pytest.raises(ConfigError, match=r"trainer.betas=\[0.9, 1.5\] is invalid"):
        validate(make_config("trainer.betas=[0.9,1.5]"))
