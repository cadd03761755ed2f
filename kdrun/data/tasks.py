"""A classification data set as a sequence of tasks (lifelong learning, scheme=lifelong):
its classes in arrival order, cut into tasks (Split-MNIST style: 10 classes, 5 tasks of
2), each task's rows, and what a prediction may choose from.

Two settings (van de Ven & Tolias 2019, "Three scenarios for continual learning"):
``task`` incremental, the task of a test example is known, so a prediction picks among
that task's classes (a head per task); ``class`` incremental, it is not, so a prediction
picks among every class seen so far (one head): the hard case."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kdrun.data.base import Data, Split
from kdrun.data.metrics import ACCURACY, Metric
from kdrun.errors import ConfigError

SETTINGS = ("task", "class")


@dataclass(frozen=True)
class TaskSequence:
    classes: tuple[tuple[int, ...], ...]  # each task's classes, tasks in arrival order
    setting: str  # task | class (SETTINGS)
    num_classes: int  # the data set's: one output each

    def __len__(self) -> int:
        return len(self.classes)

    def seen(self, task: int) -> list[int]:
        """The classes of tasks 0..task (0-based)."""
        return [c for t in self.classes[:task + 1] for c in t]

    def choices(self, task: int) -> torch.Tensor:
        """(classes, classes) bool: row y holds the classes a prediction for an example of
        class y may choose from, once tasks 0..``task`` are learnt: its own task's classes
        (task incremental) or every class seen (class incremental)."""
        allowed = torch.zeros(self.num_classes, self.num_classes, dtype=torch.bool)
        for members in self.classes[:task + 1]:
            for c in members:
                allowed[c, list(members) if self.setting == "task" else self.seen(task)] = True
        return allowed

    def old_groups(self, task: int) -> list[list[int]]:
        """The outputs a learner of task ``task`` keeps from its previous copy (LwF): each
        earlier task's classes (task incremental: a head each), or all of them as one
        distribution (class incremental)."""
        old = [list(t) for t in self.classes[:task]]
        return old if self.setting == "task" else [self.seen(task - 1)] if old else []


def task_sequence(num_classes: int, tasks: int, class_order, setting: str) -> TaskSequence:
    """``num_classes`` cut into ``tasks`` tasks in ``class_order`` (null: 0, 1, ...); the
    first tasks take one class more when they do not divide evenly."""
    if setting not in SETTINGS:
        raise ConfigError("scheme.setting", setting, f"must be one of {', '.join(SETTINGS)}")
    order = list(range(num_classes)) if class_order is None else [int(c) for c in class_order]
    if sorted(order) != list(range(num_classes)):
        raise ConfigError("scheme.class_order", class_order,
                          f"must list each of the data's {num_classes} classes (0 to "
                          f"{num_classes - 1}) once")
    if not 2 <= tasks <= num_classes:
        raise ConfigError("scheme.tasks", tasks, f"must be between 2 and the data's "
                          f"{num_classes} classes")
    cut = torch.tensor_split(torch.tensor(order), tasks)
    return TaskSequence(tuple(tuple(part.tolist()) for part in cut), setting, num_classes)


def rows_of(split: Split, classes: list[int]) -> Split:
    """The rows of ``split`` whose label is one of ``classes``, in their order."""
    return split.rows(torch.isin(split.y, torch.tensor(classes)).nonzero().squeeze(1))


def masked_accuracy(allowed: torch.Tensor) -> Metric:
    """Accuracy when a prediction for an example of class y picks the top output among
    ``allowed[y]`` only (TaskSequence.choices)."""
    def score(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        mask = allowed.to(logits.device)[labels]
        return ACCURACY.score(logits.masked_fill(~mask, float("-inf")), labels)

    return Metric("accuracy", "acc", "%", higher_is_better=True, score=score, listed=False)


def task_data(data: Data, sequence: TaskSequence, tasks: list[int], upto: int) -> Data:
    """The data of ``tasks`` (0-based): their training, validation and test rows, judged
    with the choices of a learner that has learnt tasks 0..``upto``."""
    classes = [c for t in tasks for c in sequence.classes[t]]
    return dataclasses.replace(
        data, train=rows_of(data.train, classes), val=rows_of(data.val, classes),
        test=rows_of(data.test, classes), digest=None,
        metric=masked_accuracy(sequence.choices(upto)))
