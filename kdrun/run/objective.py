"""What a run optimises, in words, as it is computed: the distilled student's loss terms,
their weights, the temperature and its T^2 factor, and which rows of a batch each term
averages over; and the plain cross-entropy of the teacher and the scratch student. It is
the run's first line and every summary row's ``objective`` column: a fused or
alternative path that trains another objective than the one configured (a wrong
temperature, weights, or positions) shows there."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from kdrun.data import Data
from kdrun.losses import Averaging, build_loss
from kdrun.run.schemes import scheme_of
from kdrun.run.summary_row import SummaryRow

# Roles that train on the labels alone, whatever the loss: the teacher, the scratch student
# and the reference trained on every label (and their int8 rows).
PLAIN_ROLES = ("teacher", "scratch", "all_labels")


@dataclass(frozen=True)
class Objective:
    distilled: str  # the distilled student's loss as computed
    plain: str  # the teacher's and the scratch student's
    # who trains with each (a scheme's own, e.g. lifelong's learners), and the roles of
    # the plain one
    names: tuple[str, str] = ("distilled student", "teacher and scratch student")
    plain_roles: tuple[str, ...] = PLAIN_ROLES

    @property
    def line(self) -> str:
        return (f"objective: {self.names[0]} = {self.distilled}; {self.names[1]} = "
                f"{self.plain} (p_t, p_s: the teacher's and the student's "
                f"softmax(logits / T))")

    def of(self, role: str) -> str:
        return self.plain if role.startswith(self.plain_roles) else self.distilled

    def on_rows(self, rows: list[SummaryRow]) -> list[SummaryRow]:
        """Each row with its own objective in an ``objective`` column."""
        return [row.with_columns(objective=self.of(row.role)) for row in rows]


def averaging(cfg: DictConfig, data: Data) -> Averaging:
    """What the terms average over in this run: a language model's positions or examples,
    and which of them carry labels (a transfer set, or a scheme's unlabelled text)."""
    scheme = scheme_of(cfg)
    unit = "position" if data.per_position else "example"
    if data.end_token is not None:  # instruction data: prompts and padding reach no loss
        unit = "response position"
    unlabelled = scheme.unlabelled_rows or (
        "the transfer set's" if data.transfer is not None and scheme.uses_transfer_set else None)
    every = f"every {unit} of a batch"
    labelled = every if unlabelled is None else (f"the labelled {unit}s of a batch "
                                                 f"({unlabelled} carry none)")
    classes = f"the {data.num_classes:,} {'tokens' if data.per_position else 'classes'}"
    return Averaging(rows=every, labelled=labelled, classes=classes)


def objective(cfg: DictConfig, data: Data) -> Objective:
    """The run's objectives in words, from the loss its distilled student trains with."""
    over = averaging(cfg, data)
    own = scheme_of(cfg).objective(cfg, over)
    if own is not None:
        return Objective(**own)
    loss_cfg = scheme_of(cfg).distillation_loss(cfg)
    try:
        with torch.random.fork_rng(devices=[]):  # a probe: the stages' draws stay theirs
            distilled = build_loss(loss_cfg).objective(over)
    except Exception:  # a loss built only with its data (a scheme's own): its settings
        distilled = "loss " + " ".join(f"{k}={v}" for k, v in loss_cfg.items() if v is not None)
    return Objective(distilled, f"CE(label, model) mean over {over.rows}")
