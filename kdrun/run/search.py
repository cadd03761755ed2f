"""What a job returns to Hydra's sweeper (``search.objectives``): one number, or several
for a multi-objective search such as a student search with Optuna's NSGA-II
(configs/hparams_search/student_search_optuna.yaml)."""

from __future__ import annotations

import statistics

# each objective, from a finished run's result: the distilled students' mean validation
# metric, and the student's size and batch-1 latency (every distilled row shares them)
SEARCH_OBJECTIVES = ("val_metric", "params", "latency_ms_b1")


def search_objectives(v) -> str | None:
    """The check of ``search.objectives``: what would be valid, or None."""
    ok = isinstance(v, list) and v and all(name in SEARCH_OBJECTIVES for name in v)
    return None if ok else (f"must be a list of one or more of {', '.join(SEARCH_OBJECTIVES)}, "
                            f"e.g. [val_metric, params]")


def sweep_values(objectives, result: dict) -> float | list[float]:
    """``objectives`` of a run's ``result`` (pipeline.run's): a number for one, a list for
    several, in their order."""
    distilled = [row for row in result["rows"] if row["role"] == "distilled"]

    def value(name: str) -> float:
        if name == "val_metric":
            return result["distilled_val_metric"]
        return float(statistics.median(float(row[name]) for row in distilled))

    values = [value(name) for name in objectives]
    return values[0] if len(values) == 1 else values
