"""A full disk, a read-only folder, a file removed under a running kdrun: one line that
names the path and the figures, exit code 2, no traceback, and the next run reuses every
stage that finished before the fault.

The faults are injected where a real disk reports them: ``os.fsync``, which every write
of kdrun's files reaches (an atomic write's temporary file, an appended log line), raises
OSError(ENOSPC) for the chosen file; torch.save's own failure (a RuntimeError without an
errno) is raised from torch.save. A real full file system (a small tmpfs) gives the same
lines: the closing note of issue 41 shows them."""

from __future__ import annotations

import errno
import os
import re
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import torch

from kdrun.errors import StorageFault
from kdrun.store import faults
from kdrun.store.cache import verify_cache
from kdrun.store.files import atomic_write, save_sealed
from tests.helpers import make_config, run_events

ARGS = ["dataset=synthetic", "dataset.n=300", "dataset.dim=10", "teacher=mlp",
        "teacher.hidden=[32]", "student=mlp", "student.hidden=[8]", "trainer.epochs=2",
        "repeats=1", "progress=false", "num_threads=1"]


def written_name(fd: int) -> str:
    """The file an fsync'ed descriptor writes, by its final name (an atomic write's
    temporary ``.NAME.tmpPID`` is NAME)."""
    name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
    return re.sub(r"^\.(.+)\.tmp\d+$", r"\1", name)


def full_disk_at(monkeypatch, site: str, code: int = errno.ENOSPC) -> list[str]:
    """From the moment the teacher's stage has finished (its summary.json is written),
    the first write of a file named ``site`` (a glob) fails with ``code``."""
    fsync, seen = os.fsync, []

    def failing_fsync(fd):
        name = written_name(fd)
        if seen and Path(name).match(site):
            raise OSError(code, os.strerror(code))
        fsync(fd)
        if name == "summary.json" and not seen:
            seen.append(name)
    monkeypatch.setattr(os, "fsync", failing_fsync)
    return seen


# every kind of file a run writes after its teacher finished
SITES = ["logits-*.pt", "key.json", "rows.csv", "state.pt", "result.pt", "summary.json",
         "metrics.csv", "events.jsonl", "scratch.pt", "summary.csv", "done.json"]


@pytest.mark.slow  # 11 sites x 2 runs (~40 s)
@pytest.mark.parametrize("site", SITES)
def test_no_space_at_each_write_is_one_line_and_the_next_run_reuses_what_finished(
        tmp_path, monkeypatch, site):
    from kdrun.run import pipeline

    cfg = make_config(*ARGS, f"cache.dir={tmp_path}/cache")
    full_disk_at(monkeypatch, site)
    with pytest.raises(StorageFault) as fault:
        pipeline.run(cfg, tmp_path / "run")
    line = str(fault.value)
    assert "\n" not in line and line.startswith("no space left on the device of ")
    assert Path(line.split("no space left on the device of ")[1].split(":")[0]).match(site)
    assert re.search(r"\d+(\.\d)? [kM]B free", line) and "run the same command again" in line
    assert verify_cache(tmp_path / "cache") == []  # nothing written before the fault is lost
    assert not [p for p in tmp_path.rglob(".*.tmp*")]  # nor a partial file left behind

    before = len(run_events(tmp_path / "run"))
    monkeypatch.undo()  # space again: the same command finishes, the teacher reused
    result = pipeline.run(cfg, tmp_path / "run")
    assert [r["role"] for r in result["rows"]] == ["teacher", "scratch", "distilled"]
    again = run_events(tmp_path / "run")[before:]
    assert (again[0]["event"], again[0]["stage"]) == ("reused", "teacher")
    assert verify_cache(tmp_path / "cache") == []


@pytest.mark.slow  # two runs each (~3 s)
@pytest.mark.parametrize("code, words", [
    (errno.EROFS, "cannot write {path}: the file system is read-only"),
    (errno.ENOENT, "{path} vanished while the run used it"),
])
def test_a_read_only_or_vanished_file_mid_run_is_one_line_and_the_next_run_reuses(
        tmp_path, monkeypatch, code, words):
    from kdrun.run import pipeline

    cfg = make_config(*ARGS, f"cache.dir={tmp_path}/cache")
    full_disk_at(monkeypatch, "state.pt", code)  # the scratch student's first epoch's state
    with pytest.raises(StorageFault) as fault:
        pipeline.run(cfg, tmp_path / "run")
    line = str(fault.value)
    assert "\n" not in line and re.search(words.format(path=r"\S+/state\.pt"), line), line
    before = len(run_events(tmp_path / "run"))
    monkeypatch.undo()
    pipeline.run(cfg, tmp_path / "run")
    again = run_events(tmp_path / "run")[before:]
    assert (again[0]["event"], again[0]["stage"]) == ("reused", "teacher")
    assert verify_cache(tmp_path / "cache") == []


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, "no space left on the device of "),
    (errno.EDQUOT, "no space left on the device of "),
    (errno.EROFS, "the file system is read-only; put output_root (runs) or cache.dir"),
    (errno.EACCES, "permission denied; put output_root"),
    (errno.ENOENT, "vanished while the run used it"),
    (errno.EIO, "the device failed writing"),
])
def test_each_storage_error_is_one_line_naming_the_file(tmp_path, code, words):
    target = tmp_path / "run" / "summary.csv"
    target.parent.mkdir()
    target.write_text("old\n")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError(code, os.strerror(code))
    with pytest.raises(StorageFault) as fault:
        atomic_write(target, fail)
    assert words in str(fault.value) and str(target) in str(fault.value)
    assert target.read_text() == "old\n"  # the file as it was
    assert [p.name for p in target.parent.iterdir()] == ["summary.csv"]  # no partial file


def test_a_file_that_vanished_is_named_by_its_own_path(tmp_path):
    gone = tmp_path / "cache" / "abc" / "result.pt"
    error = FileNotFoundError(errno.ENOENT, "No such file or directory", str(gone))
    line = str(faults.storage_fault(error))
    assert line.startswith(f"{gone} vanished while the run used it")
    assert "run the same command again" in line
    assert faults.storage_fault(ValueError("a bug")) is None  # not every error is the disk's
    assert faults.storage_fault(RuntimeError("shape mismatch")) is None


TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 832 vs 726"


@pytest.mark.parametrize("free, words", [(40_000, "no space left on the device of "),
                                         (10**12, "the device failed writing")])
def test_torch_save_failing_without_an_errno_is_told_by_the_free_space(tmp_path, monkeypatch,
                                                                         free, words):
    """torch.save's writer loses the errno: ``unexpected pos``. A disk whose free space
    cannot hold the file was full; one with room failed otherwise."""
    save = torch.save

    def failing_save(payload, target):
        if not isinstance(target, Path):  # save_sealed's in-memory copy
            return save(payload, target)
        target.write_bytes(b"x" * 500)
        raise RuntimeError(TORCH_FULL)
    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(faults, "free_bytes", lambda path: free)
    with pytest.raises(StorageFault) as fault:
        save_sealed(tmp_path / "state.pt", {"epoch": 1})
    assert str(fault.value).startswith(words)
    if free < 10**6:
        assert "40.0 kB free, writing " in str(fault.value)
    assert not list(tmp_path.iterdir())


def test_a_read_only_or_full_output_folder_is_refused_before_anything_is_written(
        tmp_path, monkeypatch):
    from kdrun.cli import preflight
    from kdrun.errors import ConfigError

    monkeypatch.setattr(preflight, "read_only", lambda path: True)
    monkeypatch.setattr(preflight.os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match=r"^cache.dir='.*' is invalid: .* is on a read-only "
                                          r"file system; choose another cache.dir$"):
        preflight._check_writable("cache.dir", str(tmp_path / "cache"))
    monkeypatch.undo()
    monkeypatch.setattr(preflight.shutil, "disk_usage",
                        lambda path: types.SimpleNamespace(free=12_000))
    with pytest.raises(ConfigError, match=r"output_root=.* no space left on the device of "
                                          r".* \(12 kB free\)"):
        preflight._check_writable("output_root", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_the_command_says_a_full_disk_in_one_line_and_exits_2(tmp_path, monkeypatch, capfd):
    from kdrun import cli

    fsync = os.fsync

    def failing_fsync(fd):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(".state.pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)
    monkeypatch.setattr(os, "fsync", failing_fsync)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["kdrun", *ARGS, "hydra.run.dir=run",
                                      f"cache.dir={tmp_path}/cache"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    out, err = capfd.readouterr()
    assert exit_.value.code == 2, err
    assert "Traceback" not in out + err and "Error executing job" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("kdrun:")]
    assert line.startswith(f"kdrun: error: no space left on the device of {tmp_path}/cache/")
    assert "state.pt" in line
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")  # the run's files are kept
    assert list(metrics.stage.unique()) == ["teacher"]


def test_a_stacked_group_out_of_memory_leaves_its_stages_to_their_jobs(monkeypatch, caplog):
    from kdrun.sweep import batched

    def exhausted(members, max_members):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                           "allocate 11334435840 bytes.")
    monkeypatch.setattr(batched, "train_planned_group", exhausted)
    assert batched.train_or_leave(["a", "b"], None) == 0
    assert "a stacked group of 2 stopped (out of memory); their jobs train them alone" \
        in caplog.text

    def bug(members, max_members):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    monkeypatch.setattr(batched, "train_planned_group", bug)
    with pytest.raises(RuntimeError, match="shapes"):
        batched.train_or_leave(["a"], None)


def test_an_allocation_failure_after_the_stages_is_one_line_and_they_are_reused(
        tmp_path, monkeypatch):
    from kdrun.errors import OutOfMemory
    from kdrun.run import pipeline

    def exhausted(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 11334435840 bytes.")
    cfg = make_config(*ARGS, "device=cpu", f"cache.dir={tmp_path}/cache")
    monkeypatch.setattr(pipeline, "side_by_side", exhausted)  # timing teacher and student
    with pytest.raises(OutOfMemory, match=r"^out of memory on cpu asking for 11.33 GB; "
                                          r"finished stages are kept in the stage cache: "
                                          r"lower trainer.batch_size"):
        pipeline.run(cfg, tmp_path / "run")
    monkeypatch.undo()
    result = pipeline.run(cfg, tmp_path / "run")
    assert all(row["reused"] for row in result["rows"])
