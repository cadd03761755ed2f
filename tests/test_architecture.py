"""The shape of the code, kept: small modules and functions, one epoch driver that every
training loop runs under, one stage protocol the batched launcher plans through."""

import ast
import math
from pathlib import Path

import torch
from torch import nn

from kdrun.data import Data, Split, load_data
from kdrun.losses import CE, KD
from kdrun.models import build_model
from kdrun.train import epochs
from kdrun.train.data_free import DataFreeGame, DataFreeSettings, fit_data_free
from kdrun.train.fit import fit
from kdrun.train.stacked import Member, train_group
from kdrun.train.targets import CachedLogits, predict_logits
from tests.helpers import make_config

PACKAGE = Path(__file__).resolve().parents[1] / "kdrun"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def test_no_module_over_400_lines_and_no_function_over_60():
    long_modules, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(PACKAGE.parent)
        if text.count("\n") > MAX_MODULE_LINES:
            long_modules.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


def test_what_schemes_call_stays_a_thin_facade_over_the_stage_protocol():
    lines = (PACKAGE / "run" / "stages.py").read_text().count("\n")
    assert lines < 200, f"kdrun/run/stages.py has {lines} lines: move a concern out of it"


def test_the_batched_launcher_overrides_no_private_method():
    from kdrun.run.stages import Stages
    from kdrun.sweep import batched

    for cls in vars(batched).values():
        if isinstance(cls, type) and issubclass(cls, Stages) and cls is not Stages:
            private = [n for n in vars(cls) if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{cls.__name__} overrides {private}"


def counting_steps(monkeypatch) -> list[int]:
    """A trainer option written once, in the epoch driver's OptimizerSteps: a counter of
    optimiser steps. Every loop that steps through the driver counts."""
    counted = [0]
    take = epochs.OptimizerSteps.take

    def counting(self, optimizer):
        counted[0] += 1
        take(self, optimizer)

    monkeypatch.setattr(epochs.OptimizerSteps, "take", counting)
    return counted


def test_a_per_step_option_written_once_reaches_all_three_loops(monkeypatch):
    counted = counting_steps(monkeypatch)
    cfg = make_config("dataset=synthetic", "dataset.n=300", "dataset.dim=10",
                      "trainer.batch_size=32", "trainer.grad_clip=1.0")
    data = load_data(cfg.dataset, cfg.split)
    batches = math.ceil(len(data.train) / 32)

    model = build_model(cfg.student, data.input_shape, data.num_classes)
    fit(model, data, CE(), cfg.trainer, stage="scratch", epochs=2, seed=0,
        device=torch.device("cpu"), progress=False)
    assert counted[0] == 2 * batches  # one model: a step per batch

    counted[0] = 0
    logits = predict_logits(model, data.train.x, 100).detach()
    members = [Member(entry=None, role="distilled", seed=s, train_seed=s, model_cfg=cfg.student,
                      loss=KD(T=4.0, alpha=0.9), targets=CachedLogits(logits), teacher_key="t",
                      cfg=cfg, context=None, data=data, device=torch.device("cpu"))
               for s in (0, 1, 2)]
    train_group(members, data, cfg.trainer, 2, torch.device("cpu"), lambda m, r: None,
                lambda m, message: None)
    assert counted[0] == 2 * batches  # a stacked group: one step per batch for all members

    counted[0] = 0
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(10, data.num_classes))
    student = nn.Sequential(nn.Flatten(), nn.Linear(10, data.num_classes))
    empty = Split(data.test.x[:0], data.test.y[:0])
    game = DataFreeGame(DataFreeSettings(z_dim=4, width=4, batch_size=8, iterations=3,
                                         student_steps=2, samples_every=0,
                                         collapse_below=0.0), (10,))
    fit_data_free(student, Data("toy", empty, empty, data.test, data.num_classes), game,
                  cfg.trainer, stage="distilled", epochs=2, seed=0, device=torch.device("cpu"),
                  teacher=type("Teacher", (), {"model": teacher})(), progress=False)
    assert counted[0] == 2 * 3 * 2  # data-free: the student's steps (the generator has its own)
