"""Content-addressed stage results: a stage trained once is reused by every run and
sweep job that needs it, and a killed stage resumes where it stopped.

A stage (the teacher, or the scratch or distilled student of one seed) lives in
``<root>/<key>/``, where ``key`` hashes exactly the resolved settings that decide
its result (``key.json`` keeps them, readable). A job that needs a stage takes the
OS file lock ``<root>/<key>.lock`` (released when the process dies, so a killed job
never blocks the others), re-checks, and trains only if no one has finished it.

Entry files: ``rows.csv`` (metric rows, appended every epoch), ``state.pt`` (the
resumable training state), ``result.pt`` (the finished checkpoint),
``summary.json`` (written last: its presence means the stage is done).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
from pathlib import Path

from filelock import FileLock

from kdrun.store import atomic_write, load_checkpoint, remove_temporaries, save_checkpoint

CACHE_VERSION = 3  # bump when a change makes old stage results invalid (3: fused CPU optimiser)
ROW_COLUMNS = ["stage", "epoch", "split", "loss", "acc", "lr", "seconds"]


def stage_key(material: dict) -> str:
    blob = json.dumps({"cache_version": CACHE_VERSION, **material}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class StageEntry:
    def __init__(self, root: Path, material: dict):
        self.material = material
        self.key = stage_key(material)
        self.dir = Path(root) / self.key
        self.rows_csv = self.dir / "rows.csv"
        self.state_pt = self.dir / "state.pt"
        self.result_pt = self.dir / "result.pt"
        self.summary_json = self.dir / "summary.json"

    @contextlib.contextmanager
    def lock(self):
        """Hold the entry's lock. Whoever holds it is the only writer, so temporary
        files found then were left by a killed writer and are removed."""
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{self.dir}.lock"):
            if self.dir.exists():
                remove_temporaries(self.dir)
            yield

    def done(self) -> bool:
        return self.summary_json.exists()

    def start(self) -> dict | None:
        """Prepare to train; return the state to resume from, if a killed run left one.
        Rows beyond that state's epoch (written after its last checkpoint) are dropped."""
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.dir / "key.json",
                     lambda tmp: tmp.write_text(json.dumps(self.material, indent=1)))
        state = load_checkpoint(self.state_pt) if self.state_pt.exists() else None
        keep = [r for r in self.read_rows() if state and r["epoch"] <= state["epoch"]]
        atomic_write(self.rows_csv, lambda tmp: _write_rows(tmp, keep))
        return state

    def append_rows(self, rows: list[dict]) -> None:
        with open(self.rows_csv, "a", newline="") as f:
            csv.DictWriter(f, ROW_COLUMNS).writerows({k: r[k] for k in ROW_COLUMNS} for r in rows)
            f.flush()
            os.fsync(f.fileno())

    def read_rows(self) -> list[dict]:
        if not self.rows_csv.exists():
            return []
        text = self.rows_csv.read_text()
        complete = text[: text.rfind("\n") + 1]  # a last line without its newline was cut by a kill
        return [_typed(r) for r in csv.DictReader(io.StringIO(complete, newline=""))]

    def save_state(self, state: dict) -> None:
        save_checkpoint(self.state_pt, state)

    def finish(self, checkpoint: dict, summary: dict) -> None:
        save_checkpoint(self.result_pt, checkpoint)
        atomic_write(self.summary_json, lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))
        self.state_pt.unlink(missing_ok=True)

    def summary(self) -> dict:
        return json.loads(self.summary_json.read_text())


def _write_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ROW_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _typed(row: dict) -> dict:
    return {**row, "epoch": int(row["epoch"]),
            **{k: float(row[k]) for k in ("loss", "acc", "lr", "seconds")}}
