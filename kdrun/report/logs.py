"""The logs a run writes as it trains: metrics.csv (and TensorBoard or MLflow records
beside it, ``logger=``) and events.jsonl. Training reports to them through ``MetricLogs``;
what is printed at the end lives in kdrun/report/table.py."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import time
from pathlib import Path

import pandas as pd

from kdrun.report.metric_log import MetricLog
from kdrun.store.faults import writing
from kdrun.store.files import atomic_write

# score: the epoch's value of the task's metric on the split (summary.csv's ``metric``
# names it: accuracy in %, or perplexity); a data-free generator's row: its samples' spread
METRIC_COLUMNS = ["stage", "seed", "epoch", "split", "loss", "score", "lr", "seconds"]


class MetricsLog(MetricLog):
    """Long-form metrics.csv, appended and flushed every epoch (a killed run keeps
    what it did). ``keys`` (dataset, method, T, alpha) are added to every row, and
    ``reused`` says whether the row was trained by this process or taken from the
    stage cache. The file starts afresh with each (re)start of a run: the stage
    cache holds every finished epoch, so nothing is lost and nothing is doubled."""

    def __init__(self, path: Path, keys: dict):
        self.path, self.keys = path, keys
        self.columns = METRIC_COLUMNS + ["reused"] + list(keys)
        atomic_write(path, lambda tmp: tmp.write_text(",".join(self.columns) + "\n"))

    def append(self, rows: list[dict], seed: int, reused: bool = False) -> None:
        with writing(self.path), open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            for row in rows:
                writer.writerow({**row, "seed": seed, "reused": reused, **self.keys})
            f.flush()
            os.fsync(f.fileno())



class MetricLogs:
    """One stage's metric rows to every chosen log: metrics.csv, and TensorBoard's event
    files with ``logger=tensorboard``, or an MLflow run with ``logger=mlflow``."""

    def __init__(self, logs: list):
        self.logs = logs

    def append(self, rows: list[dict], seed: int, reused: bool) -> None:
        for metric_log in self.logs:
            metric_log.append(rows, seed, reused=reused)

    def close(self) -> None:
        for metric_log in self.logs:
            metric_log.close()

    def finish(self, run_dir, summary: pd.DataFrame, table: str) -> None:
        """The run's end, for logs that record it (MLflow: summary, files, status)."""
        for metric_log in self.logs:
            metric_log.finish(run_dir, summary, table)

    def fail(self) -> None:
        """The run stopped on an error: a log that cannot record it (a full disk, an
        unreachable server) must not hide that error."""
        for metric_log in self.logs:
            with contextlib.suppress(Exception):
                metric_log.fail()

    def interrupt(self) -> None:
        for metric_log in self.logs:
            metric_log.interrupt()


def metric_logs(cfg, run_root: Path, metrics_csv: Path, keys: dict,
                config_hash: str) -> MetricLogs:
    """metrics.csv is rebuilt on every start (the stage cache holds what was done before);
    ``config_hash`` names the run for MLflow."""
    logs = [MetricsLog(metrics_csv, keys)]
    if cfg.logger.name == "tensorboard":
        from kdrun.report.tensorboard_log import TensorBoardLog

        logs.append(TensorBoardLog(run_root / cfg.logger.dir, cfg))
    if cfg.logger.name == "mlflow":
        from kdrun.report.mlflow_log import MlflowLog

        logs.append(MlflowLog(cfg, run_root, config_hash))
    return MetricLogs(logs)


class EventLog:
    """events.jsonl: one line per stage of a run saying whether it was trained,
    reused from the stage cache, or resumed after an interruption."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, event: str, stage: str, seed: int, key: str, **extra) -> None:
        line = {"time": time.time(), "event": event, "stage": stage, "seed": seed, "key": key,
                **extra}
        with writing(self.path), open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
