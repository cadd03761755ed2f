"""What a stage gives back: a StageResult, holding its SummaryRow, one row of the run's
summary.csv with what the stage (or an evaluated teacher) scored and the conditions
behind that number. Rows are built here only, never mutated: a scheme adds its own
columns and the pipeline the timings through methods that return new rows."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kdrun.models.quantize import INT8_SUFFIXES

if TYPE_CHECKING:
    import torch

    from kdrun.report.measure import Timing
    from kdrun.store.cache import StageEntry

# The keys of a finished stage's summary (cache summary.json) that are result columns;
# the rest of it is provenance: what the stage key holds of its arithmetic (device,
# precision, torch), data_sha256, and the rounding-only settings it ran with (threads,
# processor, trained_in, ...: provenance.ROUNDING_ONLY).
STAGE_RESULT_KEYS = ("arch", "params", "size_mb", "epochs", "best_epoch", "val_metric_best",
                     "test_metric_last", "test_metric_best_val", "train_seconds", "eval_split",
                     "selected_by")


@dataclass(frozen=True)
class RowContext:
    """What every row of one run shares: its seed, how it was evaluated, the conditions
    its numbers come from, and the keys that tell the runs of a sweep apart."""

    seed: int
    eval_split: str
    selected_by: str
    provenance: dict  # numerics columns, data_sha256, the rounding-only settings
    run: dict  # dataset, method, T, alpha

    def with_provenance(self, changes: dict) -> RowContext:
        """This context with some provenance columns as a stage really ran them."""
        return dataclasses.replace(self, provenance={**self.provenance, **changes})


@dataclass(frozen=True)
class SummaryRow:
    role: str  # teacher, scratch, distilled, teacher1.., generation1..
    seed: int
    arch: str
    params: int
    size_mb: float
    epochs: int
    best_epoch: int
    val_metric_best: float
    test_metric_last: float
    test_metric_best_val: float
    eval_split: str
    selected_by: str
    train_seconds: float
    reused: bool
    provenance: dict
    run: dict
    cache_key: str | None = None
    checkpoint: str | None = None
    scheme: dict = field(default_factory=dict)  # a scheme's own columns, e.g. generation
    figures: dict = field(default_factory=dict)  # latency, speed-up, compression

    @classmethod
    def from_stage(cls, summary: dict, *, seed: int, reused: bool, cache_key: str,
                   checkpoint: str, run: dict) -> SummaryRow:
        """The row of a trained stage, from its cache summary."""
        provenance = {k: v for k, v in summary.items()
                      if k not in STAGE_RESULT_KEYS and k != "role"}
        return cls(role=summary["role"], seed=seed, reused=reused, cache_key=cache_key,
                   checkpoint=checkpoint, provenance=provenance, run=run,
                   **{k: summary[k] for k in STAGE_RESULT_KEYS})

    @classmethod
    def evaluated_teacher(cls, context: RowContext, arch: str, figures: dict, val_metric: float,
                          test_metric: float, *, train_seconds: float, reused: bool,
                          cache_key: str | None = None, checkpoint: str | None = None,
                          **scheme) -> SummaryRow:
        """A teacher evaluated here but not trained as a stage (a user's checkpoint, an
        ensemble): no epochs, the accuracies it has now."""
        return cls(role="teacher", seed=context.seed, arch=arch, params=figures["params"],
                   size_mb=figures["size_mb"], epochs=0, best_epoch=0, val_metric_best=val_metric,
                   test_metric_last=test_metric, test_metric_best_val=test_metric,
                   eval_split=context.eval_split, selected_by=context.selected_by,
                   train_seconds=train_seconds, reused=reused, provenance=context.provenance,
                   run=context.run, cache_key=cache_key, checkpoint=checkpoint,
                   scheme=scheme)

    @property
    def is_teacher(self) -> bool:
        return self.role.startswith("teacher")

    @property
    def is_int8(self) -> bool:
        """An int8 student: quantised after training (PTQ) or quantisation-aware (QAT)."""
        return self.role.endswith(INT8_SUFFIXES)

    def as_role(self, role: str) -> SummaryRow:
        return dataclasses.replace(self, role=role)

    def with_columns(self, **scheme) -> SummaryRow:
        return dataclasses.replace(self, scheme={**self.scheme, **scheme})

    def with_figures(self, timing: Timing, teacher_params: int | None) -> SummaryRow:
        """This row with its side-by-side timing (kdrun/report/measure.py): its model's latency
        (an int8 student's: its int8 model's), and for a float32 student the speed-up over
        the teacher (none without a teacher) and whether the timing rounds agreed; for
        every student the teacher's params over its own. An ensemble member (teacher1, ...)
        gets none: the ensemble as a whole is timed."""
        if self.is_teacher and self.role != "teacher":
            return self
        who = "teacher" if self.is_teacher else "int8" if self.is_int8 else "student"
        figures = {f"latency_ms_b{b}": ms for b, ms in timing.latency_ms[who].items()}
        if not self.is_teacher:
            if not self.is_int8:  # the speed-ups are the float32 student's over the teacher
                figures.update({f"speedup_b{b}": ratio for b, ratio in timing.speedup.items()})
                figures.update({f"speedup_b{b}_reliable": ok
                                for b, ok in timing.reliable.items()})
            if teacher_params is not None:
                figures["compression"] = round(teacher_params / self.params, 3)
        return dataclasses.replace(self, figures=figures)

    def columns(self) -> dict:
        """The CSV columns, in summary.csv's order."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        nested = {name: fields.pop(name) for name in ("provenance", "run", "scheme", "figures")}
        return {**fields, **nested["provenance"], **nested["run"], **nested["scheme"],
                **nested["figures"]}


@dataclass(frozen=True)
class StageResult:
    """A finished stage: its summary row, its cache entry and, for a teacher, the model
    (a student's weights are loaded only when a scheme asks, ``Stages.load_student``)."""

    row: SummaryRow
    entry: StageEntry
    model: torch.nn.Module | None = None
