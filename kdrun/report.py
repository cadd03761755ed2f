"""Everything that turns results into files and tables: metrics.csv, summary.csv,
the printed comparison table, and ``kdrun-report`` for a sweep directory."""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
import statistics
import sys
from pathlib import Path

import pandas as pd

from kdrun.store import atomic_write

METRIC_COLUMNS = ["stage", "seed", "epoch", "split", "loss", "acc", "lr", "seconds"]
SUMMARY_COLUMNS = [
    "role", "seed", "arch", "params", "size_mb", "epochs", "best_epoch", "val_acc_best",
    "test_acc_last", "test_acc_best_val", "eval_split", "train_seconds", "latency_ms",
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


def gain_verdict(gains: list[float]) -> str:
    """Say whether the mean gain over seeds stands out of the seed-to-seed noise."""
    if len(gains) < 2:
        return "one student seed, so its noise is unknown (set repeats=3 or more)"
    lo, hi = gain_interval(gains)
    where = f"95% CI [{lo:+.2f}, {hi:+.2f}] over {len(gains)} paired seeds"
    if lo <= 0 <= hi:
        return f"{where}: within noise, no evidence that distillation changes accuracy here"
    return f"{where}: distillation {'helps' if lo > 0 else 'hurts'}, beyond seed noise"


def comparison_table(summary: pd.DataFrame, header: str) -> str:
    """Teacher / scratch / distilled rows with params and accuracies, then the gain."""
    split = summary.eval_split.iloc[0]  # "test", or "train" when the labels are random
    w = max(17, *(len(a) for a in summary.arch))
    lines = [header, f"{'role':<10} {'model':<{w}} {'params':>9}  "
                     f"{split + ' acc, last':>16}  {split + ' acc, best val':>18}"]
    by_role = {role: summary[summary.role == role] for role in ("teacher", "scratch", "distilled")}
    for role, rows in by_role.items():
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
    return "\n".join(lines)


def _signed(values: list[float]) -> str:
    text = mean_std(values)
    return text if text.startswith("-") else "+" + text


# ---------------------------------------------------------------- sweeps


def aggregate_sweep(sweep_dir: Path) -> pd.DataFrame:
    """Concatenate every job's summary.csv under ``sweep_dir`` into one table."""
    frames = []
    for path in sorted(sweep_dir.glob("*/summary.csv")):
        df = pd.read_csv(path)
        df.insert(0, "job", path.parent.name)
        frames.append(df)
    if not frames:
        raise FileNotFoundError(f"no */summary.csv under {sweep_dir}: not a kdrun sweep directory")
    return pd.concat(frames, ignore_index=True)


def write_sweep_report(sweep_dir: Path) -> Path:
    """summary.csv of all jobs and a markdown table of distilled accuracy and gain."""
    df = aggregate_sweep(sweep_dir)
    write_summary(sweep_dir / "summary.csv", df.to_dict("records"))
    keys = [k for k in ("method", "T", "alpha") if k in df and df[k].notna().any()]
    scratch = df[df.role == "scratch"].set_index(["job", "seed"]).test_acc_best_val
    distilled = df[df.role == "distilled"].set_index(["job", "seed"])
    distilled = distilled.assign(gain=distilled.test_acc_best_val - scratch).reset_index()
    table = distilled.groupby(keys, dropna=False).agg(
        n=("gain", "size"), val_acc=("val_acc_best", "mean"),
        test_acc=("test_acc_best_val", "mean"), test_std=("test_acc_best_val", "std"),
        gain=("gain", "mean"), gain_std=("gain", "std"),
    ).reset_index()
    report = sweep_dir / "report.md"
    text = f"# kdrun sweep report\n\n{sweep_dir}\n\n{markdown_table(table.round(2))}\n"
    atomic_write(report, lambda tmp: tmp.write_text(text))
    return report


def markdown_table(df: pd.DataFrame) -> str:
    rows = [list(df.columns), ["---"] * len(df.columns)] + df.astype(str).values.tolist()
    return "\n".join("| " + " | ".join(map(str, r)) + " |" for r in rows)


def main(argv: list[str] | None = None) -> int:
    """kdrun-report DIR: (re)aggregate a sweep directory, finished or not."""
    parser = argparse.ArgumentParser(prog="kdrun-report", description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        report = write_sweep_report(args.sweep_dir)
    except FileNotFoundError as e:
        print(f"kdrun-report: error: {e}", file=sys.stderr)
        return 2
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
