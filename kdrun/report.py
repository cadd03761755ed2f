"""What one run writes and prints: metrics.csv, summary.csv, events.jsonl and the
comparison table with its noise verdict. (Sweeps: kdrun/sweep.py.)"""

from __future__ import annotations

import csv
import json
import os
import statistics
import time
from pathlib import Path

import pandas as pd

from kdrun.store import atomic_write

METRIC_COLUMNS = ["stage", "seed", "epoch", "split", "loss", "acc", "lr", "seconds"]
SUMMARY_COLUMNS = [
    "role", "seed", "arch", "params", "size_mb", "latency_ms_b1", "latency_ms_b256", "epochs",
    "best_epoch", "val_acc_best", "test_acc_last", "test_acc_best_val", "eval_split",
    "train_seconds",
    "checkpoint",
]


class MetricsLog:
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
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            for row in rows:
                writer.writerow({**row, "seed": seed, "reused": reused, **self.keys})
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        """Nothing to do: every append is already flushed to disk."""


class EventLog:
    """events.jsonl: one line per stage of a run saying whether it was trained,
    reused from the stage cache, or resumed after an interruption."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, event: str, stage: str, seed: int, key: str, **extra) -> None:
        line = {"time": time.time(), "event": event, "stage": stage, "seed": seed, "key": key,
                **extra}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())


def write_summary(path: Path, rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))
    return df


# ---------------------------------------------------------------- printed table


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def gain_interval(gains: list[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the mean of paired (same-seed) gains."""
    from scipy.stats import t

    n, mean = len(gains), statistics.mean(gains)
    half = t.ppf((1 + level) / 2, n - 1) * statistics.stdev(gains) / n**0.5
    return mean - half, mean + half


def significance(gains: list[float]) -> str:
    """'helps' / 'hurts' only when the mean gain is both beyond one std of zero and
    outside its 95% interval; otherwise say which test it failed."""
    if len(gains) < 2:
        return "unknown (1 seed)"
    mean, std = statistics.mean(gains), statistics.stdev(gains)
    lo, hi = gain_interval(gains)
    if abs(mean) <= std:
        return "not significant (within 1 std)"
    if lo <= 0 <= hi:
        return "not significant (95% CI includes 0)"
    return "helps" if mean > 0 else "hurts"


def gain_verdict(gains: list[float]) -> str:
    """One sentence on whether the mean gain stands out of the seed-to-seed noise."""
    if len(gains) < 2:
        return "one student seed, so its noise is unknown (set repeats=3 or more)"
    lo, hi = gain_interval(gains)
    where = f"95% CI [{lo:+.2f}, {hi:+.2f}] over {len(gains)} paired seeds"
    verdict = significance(gains)
    if verdict in ("helps", "hurts"):
        return f"{where}: distillation {verdict}, beyond seed noise"
    return f"{where}: {verdict}, no evidence that distillation changes accuracy here"


def comparison_table(summary: pd.DataFrame, header: str) -> str:
    """Teacher / scratch / distilled rows with params and accuracies, then the gain."""
    split = summary.eval_split.iloc[0]  # "test", or "train" when the labels are random
    w = max(17, *(len(a) for a in summary.arch))
    lines = [header, f"{'role':<10} {'model':<{w}} {'params':>9}  "
                     f"{split + ' acc, last':>16}  {split + ' acc, best val':>18}"]
    by_role = {role: summary[summary.role == role] for role in ("teacher", "scratch", "distilled")}
    for role, rows in by_role.items():
        if rows.empty:  # e.g. no teacher in deep mutual learning
            continue
        lines.append(f"{role:<10} {rows.arch.iloc[0]:<{w}} {rows.params.iloc[0]:>9,}  "
                     f"{mean_std(list(rows.test_acc_last)):>16}  "
                     f"{mean_std(list(rows.test_acc_best_val)):>18}")
    scratch, distilled = by_role["scratch"], by_role["distilled"]
    gains = {col: [d - s for d, s in zip(distilled[col], scratch[col])]
             for col in ("test_acc_last", "test_acc_best_val")}
    lines.append(f"{'gain':<10} {'distilled-scratch':<{w + 10}}  "
                 f"{_signed(gains['test_acc_last']):>16}  "
                 f"{_signed(gains['test_acc_best_val']):>18}")
    lines.append(f"gain (best val): {gain_verdict(gains['test_acc_best_val'])}")
    if "compression" in distilled and distilled.compression.notna().all():
        row = distilled.iloc[0]
        lines.append(f"student vs teacher: {row.compression:.2f}x fewer parameters, "
                     f"{row.speedup_b1:.2f}x faster at batch 1, {row.speedup_b256:.2f}x at "
                     f"batch 256 ({row.size_mb:.3f} MB on disk)")
    return "\n".join(lines)


def _signed(values: list[float]) -> str:
    text = mean_std(values)
    return text if text.startswith("-") else "+" + text
