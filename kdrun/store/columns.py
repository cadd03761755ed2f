"""The names of the columns kdrun writes, and the names older versions wrote, read back
under today's: the task's metric may be a perplexity, which columns named ``acc`` hid.
Stage cache entries, run and sweep folders written before the rename read as if written
now (``kdrun-report`` on an old sweep writes its summary.csv with today's names)."""

from __future__ import annotations

RENAMED = {  # an older version's name -> today's
    "val_acc_best": "val_metric_best",
    "test_acc_last": "test_metric_last",
    "test_acc_best_val": "test_metric_best_val",
    "acc": "score",  # metrics.csv and a stage's rows.csv: the epoch's metric on its split
}


def current_names(record: dict) -> dict:
    """A row or summary with every old column name replaced by today's."""
    return {RENAMED.get(k, k): v for k, v in record.items()}


def current_columns(frame):
    """A pandas DataFrame read from an older kdrun's CSV file, with today's names."""
    return frame.rename(columns=RENAMED)
