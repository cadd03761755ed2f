"""Rows a run adds beside each student seed's scratch and distilled students when asked
for: the "scratch, all labels" reference (all_labels.py) and the int8 students
(int8_students.py). Each add-on is a module with ``wanted(cfg)`` and
``rows(stages, cfg, taught)``; a new one is a module listed in ``ADD_ONS``."""

from __future__ import annotations

from dataclasses import dataclass

from kdrun.run import all_labels, int8_students
from kdrun.run.summary_row import StageResult, SummaryRow

ADD_ONS = (all_labels, int8_students)  # in the order their rows follow a seed's students


@dataclass(frozen=True)
class Taught:
    """One student seed's scratch and distilled stages, and what taught the distilled one
    (its targets, its teacher's stage key, its scheme's columns)."""

    seed: int
    scratch: StageResult
    distilled: StageResult
    targets: object
    teacher_key: str
    columns: dict


def add_on_rows(stages, cfg, taught: Taught) -> list[SummaryRow]:
    """The rows every wanted add-on makes for this seed."""
    return [row for add_on in ADD_ONS if add_on.wanted(cfg)
            for row in add_on.rows(stages, cfg, taught)]
