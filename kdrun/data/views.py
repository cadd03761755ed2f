"""Paired views: every example seen two ways (a graph's node and its features, an image
and its depth map, a signal and a picture of it), the teacher reading one view and the
student the other (cross-modal distillation: Gupta et al. 2016, "Cross Modal
Distillation for Supervision Transfer"; graph-less students: Zhang et al. 2022, GLNN).

A builder of such data makes one RawData per view, all with the same rows in the same
order and the same labels, and returns ``paired(views, teacher_view, student_view)``:
the student's view, carrying the teacher's as its ``pair``. The split (kdrun/data/base.py)
then gives every student row its teacher's input (``Split.other``), which the teacher's
cached targets are computed on, and the teacher its own data: its view, with every
training label (``split.labeled`` is the student's label budget).
"""

from __future__ import annotations

from dataclasses import replace

from kdrun.data.raw import RawData
from kdrun.errors import ConfigError


def paired(views: dict[str, RawData], teacher_view: str, student_view: str,
           dataset: str) -> RawData:
    """The student's view with the teacher's as its pair; a view name that is not one of
    ``views`` is one line naming those there are."""
    for key, name in (("dataset.teacher_view", teacher_view),
                      ("dataset.student_view", student_view)):
        if name not in views:
            raise ConfigError(key, name, f"dataset={dataset} has the views "
                              f"{', '.join(sorted(views))}")
    student = views[student_view]
    if teacher_view == student_view:  # one view for both: plain data
        return student
    return replace(student, pair=views[teacher_view])
