"""Run-directory layout and crash-safe checkpoint files.

Checkpoints are written to a temporary file and renamed into place, so a killed
run never leaves a half-written ``.pt``; they hold only tensors and plain
containers and are loaded with ``weights_only=True``, so loading one never runs code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

TEMPORARY = re.compile(r"\..+\.tmp\d+")  # .<name>.tmp<pid>: a file being written


class RunDir:
    """Where one run's files go: metrics.csv, summary.csv, checkpoints/."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.metrics_csv = self.root / "metrics.csv"
        self.summary_csv = self.root / "summary.csv"
        self.checkpoints = self.root / "checkpoints"
        self.events = self.root / "events.jsonl"  # what each stage did: trained, reused, resumed
        self.done_json = self.root / "done.json"  # written last: the run finished

    def done(self) -> dict | None:
        return json.loads(self.done_json.read_text()) if self.done_json.exists() else None

    def mark_done(self, info: dict) -> None:
        atomic_write(self.done_json, lambda tmp: tmp.write_text(json.dumps(info)))

    def checkpoint(self, role: str, seed: int, first_seed: int) -> Path:
        """teacher.pt / scratch.pt / distilled.pt; extra student seeds get ``.seed<N>``."""
        suffix = "" if role == "teacher" or seed == first_seed else f".seed{seed}"
        return self.checkpoints / f"{role}{suffix}.pt"


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path`` in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # matches TEMPORARY
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_temporaries(folder: Path) -> None:
    """Delete the temporary files that a writer killed mid-write left in ``folder``.
    Call it only where no other process can be writing there (under the folder's lock,
    or in a run directory, which one process runs at a time)."""
    for tmp in Path(folder).glob(".*.tmp*"):
        if TEMPORARY.fullmatch(tmp.name):
            tmp.unlink(missing_ok=True)


def link_or_copy(source: Path, target: Path) -> None:
    """Put a finished (never rewritten) file at ``target``: a hard link where the file
    system allows one, else a copy; atomic either way."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:  # renaming a link onto another link of the same file leaves both in place
        tmp.unlink(missing_ok=True)


def save_checkpoint(path: Path, payload) -> None:
    """Tensors and plain containers only, so that load_checkpoint can read them."""
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
