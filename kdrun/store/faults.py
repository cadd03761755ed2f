"""A file kdrun could not write or read because of where it lives — a full disk, a
read-only or forbidden folder, a file removed under a running kdrun — as one line that
names the path, the figures and what would help (``StorageFault``). Every write of
kdrun's own files goes through ``writing(path)``; whatever slips past it (a library's
write) is named by ``storage_fault`` at the run's top."""

from __future__ import annotations

import contextlib
import errno
import gc
import shutil
import traceback
from pathlib import Path

from kdrun.errors import StorageFault

NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
NOT_WRITABLE = {errno.EROFS: "the file system is read-only",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
VANISHED = {errno.ENOENT, errno.ESTALE}
# torch.save's C++ writer reports a failed write in these words, with no errno
TORCH_WRITE_FAILED = ("unexpected pos", "iostream error", "failed writing file",
                      "file write failed")
KEPT = "what finished is kept: run the same command again to go on from there"
WHERE = "output_root (runs) or cache.dir (the stage cache)"


def storage_fault(error: BaseException, path: Path | None = None, size: int | None = None,
                  written: int | None = None) -> StorageFault | None:
    """The one-line fault for ``error``, met writing or reading ``path`` (``size`` bytes
    to write, ``written`` of them written), or None when it is not a storage fault."""
    if isinstance(error, StorageFault):
        return error
    if isinstance(error, OSError) and error.errno is not None:
        path = Path(error.filename) if error.filename else path
        code = error.errno
    elif isinstance(error, RuntimeError) and any(t in str(error) for t in TORCH_WRITE_FAILED):
        # no errno: a full disk if what was being written does not fit in what is free
        need = max(size or 0, written or 0) + (1 << 20)
        code = errno.ENOSPC if path is not None and free_bytes(path) < need else errno.EIO
    else:
        return None
    shown = path if path is not None else "a file"
    if code in NO_SPACE:
        figures = no_space_figures(path, size, written)
        return StorageFault(f"no space left on the device of {shown}: {figures}; free some, "
                            f"or put {WHERE} on a disk with room; {KEPT}")
    if code in NOT_WRITABLE:
        return StorageFault(f"cannot write {shown}: {NOT_WRITABLE[code]}; put {WHERE} in a "
                            f"folder you can write")
    if code in VANISHED:
        return StorageFault(f"{shown} vanished while the run used it (removed by another "
                            f"process?); run the same command again: what is missing is "
                            f"computed anew")
    if code == errno.EIO or isinstance(error, RuntimeError):
        return StorageFault(f"the device failed writing {shown} (input/output error); "
                            f"check the disk, or put {WHERE} on another; {KEPT}")
    return None


def no_space_figures(path: Path | None, size: int | None, written: int | None) -> str:
    free = "free space unknown" if path is None else f"{mb(free_bytes(path))} free"
    if size is not None:
        return f"{free}, writing {mb(size)}"
    return f"{free}, after {mb(written)} of the file" if written else free


def free_bytes(path: Path) -> int:
    """Free bytes on the file system of ``path`` (of its nearest existing folder)."""
    return shutil.disk_usage(nearest_existing(path)).free


def nearest_existing(path: Path) -> Path:
    """``path``, or the nearest of its parents that exists (where it would be made)."""
    return next(p for p in (Path(path), *Path(path).parents) if p.exists())


def release_frames(error: BaseException) -> None:
    """Drop what the frames of ``error`` (and the errors it arose from) hold: torch.save's
    writer, held there, keeps a removed file's space in use until it is collected."""
    while error is not None:
        traceback.clear_frames(error.__traceback__)
        error = error.__context__
    gc.collect()


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


@contextlib.contextmanager
def writing(path: Path, size: int | None = None, partial: Path | None = None):
    """Inside: a write of ``path`` (through ``partial``, a temporary file that is never
    left behind); a storage error becomes its one-line StorageFault."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        written = partial.stat().st_size if partial is not None and partial.exists() else None
        if partial is not None:  # first, so that the free space said is what there is
            release_frames(e)
            partial.unlink(missing_ok=True)
        fault = storage_fault(e, Path(path), size, written)
        if fault is None:
            raise
        raise fault from e
    finally:
        if partial is not None:
            partial.unlink(missing_ok=True)
