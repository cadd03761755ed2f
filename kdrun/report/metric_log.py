"""What every destination of a run's metric rows is (metrics.csv, TensorBoard, MLflow)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


class MetricLog:
    """One destination of a run's metric rows. ``finish``, ``fail`` and ``interrupt``
    tell it how the run ended (MLflow records it); by default they do nothing."""

    def append(self, rows: list[dict], seed: int, reused: bool = False) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing to do unless the log holds something open."""

    def finish(self, run_dir, summary: pd.DataFrame, table: str) -> None:
        """The run ended: its summary and printed table."""

    def fail(self) -> None:
        """The run stopped on an error."""

    def interrupt(self) -> None:
        """The user stopped the run."""
