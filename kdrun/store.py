"""Run-directory layout and crash-safe checkpoint files.

Checkpoints are written to a temporary file and renamed into place, so a killed
run never leaves a half-written ``.pt``; they hold only tensors and plain
containers and are loaded with ``weights_only=True``, so loading one never runs code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import torch

TEMPORARY = re.compile(r"\..+\.tmp\d+")  # .<name>.tmp<pid>: a file being written


class CorruptFile(Exception):
    """A file that is missing, or does not match the checksum recorded with it."""


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


def copy_file(source: Path, target: Path) -> None:
    """Put a copy of a finished file at ``target``, atomically. A copy, not a hard link:
    a run's checkpoint must not change when its stage-cache entry is later damaged or
    set aside. An identical file already there is left alone."""
    if target.exists() and sha256_file(target) == sha256_file(source):
        return
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def digest_path(path: Path) -> Path:
    """``<name>.sha256`` beside ``path``: the checksum recorded when it was complete."""
    return path.with_name(path.name + ".sha256")


def write_digest(path: Path) -> None:
    digest = sha256_file(path)
    atomic_write(digest_path(path), lambda tmp: tmp.write_text(digest + "\n"))


def read_checked(path: Path) -> bytes:
    """The bytes of ``path``, if they match its recorded checksum; else CorruptFile."""
    try:
        data = path.read_bytes()
        recorded = digest_path(path).read_text().strip()
    except OSError as e:
        raise CorruptFile(f"{Path(e.filename).name} is missing") from e
    if hashlib.sha256(data).hexdigest() != recorded:
        raise CorruptFile(f"{path.name} does not match its checksum")
    return data


def save_checked(path: Path, payload) -> None:
    """save_checkpoint, then record the file's checksum beside it."""
    save_checkpoint(path, payload)
    write_digest(path)


def load_checked(path: Path):
    """A checkpoint written by save_checked, or None when it is missing or does not
    match its checksum (read once, so what is checked is what is loaded)."""
    try:
        data = read_checked(path)
    except CorruptFile:
        return None
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def save_checkpoint(path: Path, payload) -> None:
    """Tensors and plain containers only, so that load_checkpoint can read them."""
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
