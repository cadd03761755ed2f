"""The task metric a data set is judged by: its name, which direction is better, and how
it is computed from a model's outputs and the targets. Model selection (the best
validation epoch), the table, the gain's verdict, the sweep report and its figures read
it from here; a data set declares its own (``RawData.metric``, accuracy by default).
Summary and metric files keep their ``acc`` column names for whatever the metric is,
with its name and direction in the ``metric`` and ``higher_is_better`` columns: a
report reads a metric of a user's own package back from those."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Metric:
    name: str  # e.g. "accuracy": what reports call it
    short: str  # e.g. "acc": what the printed table calls it
    unit: str  # e.g. "%"; a gain is in "points" of it
    higher_is_better: bool
    # outputs (..., examples, classes) and targets (examples,) -> the metric over the
    # examples, one value per leading index: a stacked group scores all its members at once
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    listed: bool = True  # in METRICS, by name; False: a variant of a listed metric's

    def compute(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        """The metric of one model's outputs."""
        return float(self.score(outputs, targets))

    def better(self, value: float, than: float) -> bool:
        """Whether ``value`` is strictly better than ``than`` (NaN is never better)."""
        return value > than if self.higher_is_better else value < than

    @property
    def worst(self) -> float:
        """A value every real one beats: where a best-so-far starts."""
        return -math.inf if self.higher_is_better else math.inf

    def improvement(self, gain: float) -> float:
        """``gain`` (distilled minus scratch) signed so that above 0 is better."""
        return gain if self.higher_is_better else -gain

    def __post_init__(self):
        if self.listed:
            METRICS[self.name] = self  # found by name when a report reads a summary back


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Percent of examples whose top class is the label (the share in float32, as it always
    was, times 100 in float64)."""
    return (logits.argmax(-1) == labels).float().mean(-1).double() * 100


def _perplexity(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """exp of the mean cross-entropy (nats) of the targets: a language model's next-token
    perplexity when each row is a position (kdrun/train/tokens.py); the vocabulary size
    for a uniform guess, 1 for a certain and right one."""
    log_p = torch.log_softmax(logits.double(), -1)
    picked = log_p.gather(-1, targets.expand(logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return (-picked).mean(-1).exp()


METRICS: dict[str, Metric] = {}  # every metric defined so far, by name
ACCURACY = Metric("accuracy", "acc", "%", higher_is_better=True, score=_accuracy)
PERPLEXITY = Metric("perplexity", "ppl", "", higher_is_better=False, score=_perplexity)


def metric_named(name, higher_is_better=None) -> Metric:
    """The metric a summary names in its ``metric`` column, with the direction of its
    ``higher_is_better`` column (accuracy for a summary without them)."""
    if not isinstance(name, str):
        return ACCURACY
    if name in METRICS:
        return METRICS[name]
    return Metric(name, name, "", higher_is_better=str(higher_is_better) != "False",
                  score=_not_here)


def _not_here(logits, labels) -> torch.Tensor:
    raise RuntimeError("a metric read back from a summary reports; it does not compute")
