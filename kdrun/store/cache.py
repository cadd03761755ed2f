"""Content-addressed stage results: a stage trained once is reused by every run and
sweep job that needs it, and a killed stage resumes where it stopped.

A stage (the teacher, or the scratch or distilled student of one seed) lives in
``<root>/<key>/``, where ``key`` hashes exactly the resolved settings that decide
its result (kdrun/run/provenance.py; ``key.json`` keeps them, readable). A job that needs
a stage takes the OS file lock ``<root>/<key>.lock`` (released when the process dies,
so a killed job never blocks the others), re-checks, and trains only if no one has
finished it.

Entry files: ``rows.csv`` (metric rows, appended every epoch), ``state.pt`` (the
resumable training state), ``result.pt`` (the finished checkpoint),
``summary.json`` (written last: its presence means the stage is done). Nothing is
read back unchecked: ``summary.json`` carries its own checksum and those of
``result.pt`` and ``rows.csv``; ``state.pt`` and the teacher's logits carry their
own (store.save_sealed). A finished entry that fails is never used: it is moved to
``<root>/set_aside/`` with one warning line, and the stage is computed again.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from filelock import FileLock

from kdrun.store.columns import current_names
from kdrun.store.faults import writing
from kdrun.store.files import (
    CorruptFile,
    atomic_write,
    load_sealed,
    remove_temporaries,
    save_checkpoint,
    save_sealed,
    seal,
    sha256_file,
    unseal,
)

log = logging.getLogger("kdrun")

CACHE_VERSION = 5  # bump when a change makes old stage results invalid (5: soft_kl written out)
ROW_COLUMNS = ["stage", "epoch", "split", "loss", "score", "lr", "seconds"]
SET_ASIDE = "set_aside"  # <root>/set_aside/<key>-<time>/: entries that failed their checksums


def stage_key(material: dict) -> str:
    blob = json.dumps({"cache_version": CACHE_VERSION, **material}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class StageEntry:
    def __init__(self, root: Path, material: dict):
        self.material = material
        self.key = stage_key(material)
        self.root = Path(root)
        self._files(self.root / self.key)

    @classmethod
    def at(cls, folder: Path) -> StageEntry:
        """The entry stored in ``folder`` (its settings unread): to check it."""
        entry = cls.__new__(cls)
        entry.material, entry.key, entry.root = {}, folder.name, folder.parent
        entry._files(folder)
        return entry

    def _files(self, folder: Path) -> None:
        self.dir = folder
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
        """Finished and intact. A finished entry whose files fail their checksums (or an
        unfinished one whose finished files are gone) is set aside, with a warning."""
        problem = self.problem()
        if problem is not None:
            self.set_aside(problem)
        return self.summary_json.exists()

    def problem(self) -> str | None:
        """Why this entry cannot be trusted, or None (also for one still in training)."""
        if not self.summary_json.exists():
            if self.result_pt.exists() and load_sealed(self.state_pt) is None:
                return "summary.json is missing"  # a finished entry, partly deleted
            return None
        try:
            files = self._record()["files"]
            for name, digest in files.items():
                path = self.dir / name
                if not path.exists():
                    return f"{name} is missing"
                if sha256_file(path) != digest:
                    return f"{name} does not match its checksum"
        except CorruptFile as e:
            return str(e)
        return None

    def _record(self) -> dict:
        return unseal(self.summary_json.read_bytes(), "summary.json")

    def set_aside(self, problem: str) -> Path:
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}"
        target = self.root / SET_ASIDE / f"{self.key}-{stamp}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.dir, target)
        log.warning("stage cache: %s failed its check (%s); moved to %s, computing it again",
                    self.dir, problem, target)
        return target

    def start(self, group_epoch: int | None = None) -> dict | None:
        """Prepare to train; return the state to resume from, if a killed run left an
        intact one. Rows beyond that state's epoch (written after its last checkpoint)
        are dropped. ``group_epoch``: the stage trains in a stacked group whose own state
        (kdrun/train/stacked.py) resumes it after that epoch (0: from the start)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.dir / "key.json",
                     lambda tmp: tmp.write_text(json.dumps(self.material, indent=1)))
        rows = self.read_rows()
        if group_epoch is not None:
            keep = [r for r in rows if r["epoch"] <= group_epoch]
            atomic_write(self.rows_csv, lambda tmp: _write_rows(tmp, keep))
            return None
        state = load_sealed(self.state_pt)
        if state is None and self.state_pt.exists():
            log.warning("stage cache: %s does not match its checksum; training this stage "
                        "from the start", self.state_pt)
        elif state is None and rows:
            log.warning("stage cache: %s has epochs in rows.csv but no state.pt (killed "
                        "before its first save, or deleted); training this stage from the "
                        "start", self.dir)
        keep = [r for r in rows if state and r["epoch"] <= state["epoch"]]
        atomic_write(self.rows_csv, lambda tmp: _write_rows(tmp, keep))
        return state

    def append_rows(self, rows: list[dict]) -> None:
        with writing(self.rows_csv), open(self.rows_csv, "a", newline="") as f:
            csv.DictWriter(f, ROW_COLUMNS).writerows({k: r[k] for k in ROW_COLUMNS} for r in rows)
            f.flush()
            os.fsync(f.fileno())

    def read_rows(self) -> list[dict]:
        if not self.rows_csv.exists():
            return []
        text = self.rows_csv.read_text()
        complete = text[: text.rfind("\n") + 1]  # a last line without its newline was cut by a kill
        return [_typed(current_names(r))
                for r in csv.DictReader(io.StringIO(complete, newline=""))]

    def save_state(self, state: dict) -> None:
        save_sealed(self.state_pt, state)

    def finish(self, checkpoint: dict, summary: dict) -> None:
        """result.pt, then summary.json in one atomic write: the summary and the
        checksums of result.pt and rows.csv, sealed by a checksum of its own."""
        save_checkpoint(self.result_pt, checkpoint)
        files = {p.name: sha256_file(p) for p in (self.result_pt, self.rows_csv)}
        record = seal({"summary": summary, "files": files})
        atomic_write(self.summary_json, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
        self.state_pt.unlink(missing_ok=True)

    def summary(self) -> dict:
        return current_names(self._record()["summary"])

    def record_given(self, source: str) -> None:
        """Mark an entry for a teacher that was given, not trained: no weights of its
        own, but a sealed record of what is computed from it."""
        if not self.summary_json.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            record = seal({"summary": {"given": source}, "files": {}})
            atomic_write(self.summary_json,
                         lambda tmp: tmp.write_text(json.dumps(record, indent=1)))

    def derived(self) -> list[str]:
        """Files computed later from this finished stage (e.g. the teacher's logits)."""
        return self._record().get("derived", []) if self.summary_json.exists() else []

    def note_derived(self, name: str) -> None:
        """Record that ``name`` now exists, so that its loss is noticed (call under the
        lock, on a finished entry)."""
        if self.summary_json.exists() and name not in self.derived():
            record = self._record()
            record["derived"] = [*record.get("derived", []), name]
            atomic_write(self.summary_json,
                         lambda tmp: tmp.write_text(json.dumps(seal(record), indent=1)))

    def digest(self, name: str) -> str:
        """The SHA-256 recorded for a finished file (``result.pt`` or ``rows.csv``)."""
        return self._record()["files"][name]

    def result(self) -> dict:
        """The finished checkpoint, read once and checked against its recorded checksum."""
        data = self.result_pt.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.digest("result.pt"):
            raise CorruptFile(f"{self.result_pt} does not match its checksum")
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def verify_cache(root: Path) -> list[tuple[Path, str]]:
    """(entry folder, problem) for every entry under ``root`` that fails its checks."""
    bad = []
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir() and p.name != SET_ASIDE):
        entry = StageEntry.at(folder)
        problem = entry.problem()
        derived = entry.derived() if problem is None else []
        for name in sorted({*derived, *(p.name for p in folder.glob("logits-*.pt"))}):
            if load_sealed(folder / name) is None:
                problem = problem or f"{name} is missing or does not match its checksum"
        if problem:
            bad.append((folder, problem))
    return bad


def _write_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ROW_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _typed(row: dict) -> dict:
    return {**row, "epoch": int(row["epoch"]),
            **{k: float(row[k]) for k in ("loss", "score", "lr", "seconds")}}


def main(argv: list[str] | None = None) -> int:
    """kdrun-cache verify [--set-aside] CACHE_DIR: check every stage's files against
    their checksums; exit 1 if any fails."""
    import argparse

    parser = argparse.ArgumentParser(prog="kdrun-cache", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check every entry's files")
    verify.add_argument("cache_dir", type=Path, nargs="?", default=Path("outputs/cache"))
    verify.add_argument("--set-aside", action="store_true",
                        help=f"move damaged entries to CACHE_DIR/{SET_ASIDE}/ (a damaged "
                             f"logits file is left to be recomputed when next needed)")
    args = parser.parse_args(argv)
    if not args.cache_dir.is_dir():
        print(f"kdrun-cache: error: no folder {args.cache_dir}", file=sys.stderr)
        return 2
    bad = verify_cache(args.cache_dir)
    checked = sum(1 for p in args.cache_dir.iterdir() if p.is_dir() and p.name != SET_ASIDE)
    for folder, problem in bad:
        print(f"{folder.name}: {problem}")
        entry = StageEntry.at(folder)
        if args.set_aside and entry.problem():  # a lost logits file is just recomputed
            entry.set_aside(problem)
    print(f"{checked} stages checked, " + (f"{len(bad)} damaged" if bad else "all intact"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
