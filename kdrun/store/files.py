"""Run-directory layout and crash-safe checkpoint files.

Checkpoints are written to a temporary file and renamed into place, so a killed
run never leaves a half-written ``.pt``; they hold only tensors and plain
containers and are loaded with ``weights_only=True``, so loading one never runs code.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import torch

from kdrun.store.faults import writing

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

    @property
    def failed_json(self) -> Path:
        """Written when a sweep's job fails: its one-line error, for the sweep report."""
        return self.root / "failed.json"

    def mark_failed(self, error: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.failed_json, lambda tmp: tmp.write_text(json.dumps({"error": error})))

    @property
    def interrupted_json(self) -> Path:
        """Written when a run is interrupted (Ctrl-C): where, and how to resume; removed
        when the run is started again."""
        return self.root / "interrupted.json"

    def mark_interrupted(self, where: str | None, resume: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.interrupted_json, lambda tmp: tmp.write_text(json.dumps(
            {"interrupted_at": where, "resume_with": resume})))

    def checkpoint(self, role: str, seed: int, first_seed: int) -> Path:
        """teacher.pt / scratch.pt / distilled.pt; extra student seeds get ``.seed<N>``."""
        suffix = "" if role == "teacher" or seed == first_seed else f".seed{seed}"
        return self.checkpoints / f"{role}{suffix}.pt"


def atomic_write(path: Path, write, size: int | None = None) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path`` in one step; a full
    disk, a read-only folder, ... is a one-line StorageFault (``size``: the bytes being
    written, for its message), and ``path`` is left as it was."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # matches TEMPORARY
    with writing(path, size, partial=tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


def remove_temporaries(folder: Path) -> None:
    """Delete the temporary files that a writer killed mid-write left in ``folder``.
    Call it only where no other process can be writing there (under the folder's lock,
    or in a run directory, which one process runs at a time)."""
    for tmp in Path(folder).glob(".*.tmp*"):
        if TEMPORARY.fullmatch(tmp.name):
            tmp.unlink(missing_ok=True)


def copy_file(source: Path, target: Path, digest: str) -> None:
    """Put a copy of a finished file whose SHA-256 is ``digest`` at ``target``,
    atomically. A copy, not a hard link: a run's checkpoint must not change when its
    stage-cache entry is later damaged or set aside. An identical file already there
    is left alone."""
    if target.exists() and sha256_file(target) == digest:
        return
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_sha256(path: Path) -> str:
    """``sha256_file``, hashed once per process while the file is unchanged (its size and
    modification time): every stage of a run asks for its weights' hash."""
    stat = path.stat()
    return _sha256_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def seal(data: dict) -> dict:
    """``data`` with the SHA-256 of its canonical JSON added: a JSON file that checks itself."""
    return {**data, "sha256": hashlib.sha256(_canonical(data)).hexdigest()}


def unseal(raw: bytes, name: str) -> dict:
    """The data of a sealed JSON file's bytes; CorruptFile if they are not what was sealed."""
    try:
        data = json.loads(raw.decode())
        recorded = data.pop("sha256")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptFile(f"{name} is not a sealed kdrun file") from e
    if hashlib.sha256(_canonical(data)).hexdigest() != recorded:
        raise CorruptFile(f"{name} does not match its checksum")
    return data


def _canonical(data: dict) -> bytes:
    return json.dumps(data, sort_keys=True).encode()


def save_sealed(path: Path, payload) -> None:
    """A checkpoint that carries the checksum of its own content, in one file written
    atomically: a kill can never leave a file and a checksum that disagree."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    blob = buffer.getvalue()
    atomic_write(path, lambda tmp: torch.save(
        {"sha256": hashlib.sha256(blob).hexdigest(),
         "blob": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}, tmp), size=len(blob))


def load_sealed(path: Path):
    """What save_sealed wrote, or None when the file is missing, unreadable or does not
    match the checksum it carries."""
    try:
        outer = load_checkpoint(path)
        blob = outer["blob"].numpy().tobytes()
        if hashlib.sha256(blob).hexdigest() != outer["sha256"]:
            return None
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception:  # missing, truncated, not a zip, not our layout: never trusted
        return None


def save_checkpoint(path: Path, payload) -> None:
    """Tensors and plain containers only, so that load_checkpoint can read them."""
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
