"""kill -9 at the worst moments, then re-run: the run completes, every epoch's metrics
appear once, the checkpoints load, and they equal an uninterrupted run's.

The kill is real (SIGKILL, no clean-up of any kind) and lands at a precise point:
the `kdrun` subprocess starts with a ``sitecustomize`` module on its path that wraps
kdrun's file writers and kills the process the n-th time it reaches the chosen
point. kdrun itself has no test hooks.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from kdrun.store.cache import StageEntry
from kdrun.store.files import copy_file, load_checkpoint, load_sealed
from tests.helpers import KDRUN

ARGS = ["dataset=synthetic", "dataset.n=300", "dataset.dim=10", "teacher=mlp",
        "teacher.hidden=[32]", "student=mlp", "student.hidden=[8]", "trainer.epochs=3",
        "repeats=1", "progress=false", "num_threads=1", "hydra.run.dir=run"]

KILLER = '''
import os, signal, sys
point = os.environ.get("KDRUN_KILL_AT")  # "rows:<stage>:<n>" or "write:<file name>:<n>"
if point:
    import kdrun.run.pipeline  # noqa: F401  (imports every module that writes files)
    from kdrun.store import cache, files as store

    kind, target, nth = point.split(":")
    hits = [0]

    def hit():
        hits[0] += 1
        if hits[0] == int(nth):
            sys.stderr.write(f"killing at {point}\\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    if kind == "rows":  # after an epoch's rows are on disk, before its state is saved
        append_rows = cache.StageEntry.append_rows

        def killing_append_rows(self, rows):
            append_rows(self, rows)
            if rows[0]["stage"] == target:
                hit()
        cache.StageEntry.append_rows = killing_append_rows
    else:  # a checkpoint or summary half-way: the temporary file written, not yet renamed
        atomic_write = store.atomic_write

        def killing_atomic_write(path, write, **options):
            if path.name == target:
                atomic_write(path, lambda tmp: (write(tmp), hit()), **options)
            else:
                atomic_write(path, write, **options)
        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("kdrun") and \\
                    getattr(module, "atomic_write", None) is atomic_write:
                module.atomic_write = killing_atomic_write
'''

# One kill per process, each at a point the run reaches again after the previous kill.
KILLS = [
    "rows:teacher:2",  # teacher epoch 2's rows written, its state not yet
    "write:state.pt:1",  # resumed teacher: writing epoch 2's state again
    "write:result.pt:1",  # the teacher's final checkpoint
    "rows:scratch:2",
    "write:summary.json:1",  # the scratch stage's "done" marker (the teacher is reused now)
    "rows:distilled:1",
    "write:state.pt:1",  # distilled, resumed from nothing: epoch 1's state
    "write:summary.csv:1",  # the run's own summary, after every stage finished
]


def kdrun(cwd: Path, cache: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "KDRUN_KILL_AT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        filter(None, [str(cwd.parent / "killer"), env.get("PYTHONPATH")])))
    if kill_at:
        env["KDRUN_KILL_AT"] = kill_at
    return subprocess.run([KDRUN, *ARGS, f"cache.dir={cache}"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def structure(run: Path) -> dict:
    return {
        "files": sorted(str(p.relative_to(run)) for p in run.rglob("*")
                        if p.is_file() and p.name != "kdrun.log"),
        "metric_keys": sorted(map(tuple, pd.read_csv(run / "metrics.csv")
                                  [["stage", "seed", "epoch", "split"]].values.tolist())),
        "summary_roles": list(pd.read_csv(run / "summary.csv").role),
        "summary_columns": list(pd.read_csv(run / "summary.csv").columns),
    }


@pytest.mark.slow
def test_sigkill_at_eight_points_then_rerun_matches_an_uninterrupted_run(tmp_path):
    (tmp_path / "killer").mkdir()
    (tmp_path / "killer" / "sitecustomize.py").write_text(KILLER)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    clean.mkdir()
    killed.mkdir()
    assert kdrun(clean, clean / "cache").returncode == 0

    for point in KILLS:
        p = kdrun(killed, killed / "cache", point)
        assert p.returncode == -9 and f"killing at {point}" in p.stderr, (point, p.stderr)
    p = kdrun(killed, killed / "cache")
    assert p.returncode == 0, p.stderr

    run, reference = killed / "run", clean / "run"
    assert structure(run) == structure(reference)
    metrics = pd.read_csv(run / "metrics.csv")
    assert not metrics.duplicated(["stage", "seed", "epoch", "split"]).any()
    for role in ("teacher", "scratch", "distilled"):
        ours = load_checkpoint(run / "checkpoints" / f"{role}.pt")  # weights_only=True
        theirs = load_checkpoint(reference / "checkpoints" / f"{role}.pt")
        for name, tensor in theirs["model"].items():
            torch.testing.assert_close(ours["model"][name], tensor, rtol=0, atol=0)
    assert not [p for p in killed.rglob("*") if ".tmp" in p.name]  # no temporaries left behind
    cache_rows = [pd.read_csv(f) for f in (killed / "cache").glob("*/rows.csv")]
    assert all(not r.duplicated(["epoch", "split"]).any() for r in cache_rows)
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert {e["stage"] for e in events if e["event"] == "resumed"} >= {"teacher", "scratch"}



def test_a_run_checkpoint_is_a_copy_that_later_damage_to_the_cache_cannot_reach(tmp_path):
    source, target = tmp_path / "result.pt", tmp_path / "run" / "teacher.pt"
    source.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    copy_file(source, target, digest)
    copy_file(source, target, digest)  # a re-run copies the same cached file again
    assert target.read_bytes() == b"weights"
    assert sorted(p.name for p in target.parent.iterdir()) == ["teacher.pt"]
    source.write_bytes(b"damage")
    assert target.read_bytes() == b"weights" and not os.path.samefile(source, target)


def test_a_metrics_row_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    entry = StageEntry(tmp_path, {"stage": "teacher"})
    entry.start()
    row = {"stage": "teacher", "epoch": 1, "split": "val", "loss": 0.5, "score": 80.0, "lr": 0.1,
           "seconds": 1.0}
    entry.append_rows([row])
    with open(entry.rows_csv, "a") as f:
        f.write("teacher,2,val,0.4,8")  # the kill came mid-line: 8 of 81.25
    assert entry.read_rows() == [row]
    (entry.dir / f".state.pt.tmp{os.getpid() + 1}").write_bytes(b"half")
    with entry.lock():  # whoever holds the lock is the only writer: the rest is stale
        assert not list(entry.dir.glob(".*.tmp*"))


def test_a_nan_in_distillation_stops_it_and_keeps_every_file_written_before(tmp_path,
                                                                            monkeypatch):
    from kdrun.errors import TrainingDiverged
    from kdrun.losses import KD
    from kdrun.run import pipeline
    from tests.helpers import make_config

    cfg = make_config("dataset=synthetic", "dataset.n=300", "dataset.dim=10", "teacher=mlp",
                      "teacher.hidden=[32]", "student.hidden=[8]", "trainer.epochs=3",
                      "trainer.batch_size=50", "repeats=1", "progress=false",
                      f"cache.dir={tmp_path}/cache")
    forward, calls = KD.forward, []

    def nan_in_epoch_2(self, *args):  # 5 training steps per epoch: step 2 of epoch 2
        calls.append(1)
        loss = forward(self, *args)
        return loss * float("nan") if len(calls) == 7 else loss

    monkeypatch.setattr(KD, "forward", nan_in_epoch_2)
    with pytest.raises(TrainingDiverged, match="distilled stage diverged at epoch 2, step 2"):
        pipeline.run(cfg, tmp_path / "run")
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert metrics.groupby("stage").epoch.max().to_dict() == {"teacher": 3, "scratch": 3,
                                                              "distilled": 1}
    assert metrics.loss.notna().all() and not metrics.duplicated().any()
    for role in ("teacher", "scratch"):
        assert "model" in load_checkpoint(tmp_path / "run" / "checkpoints" / f"{role}.pt")
    (state,) = (tmp_path / "cache").glob("*/state.pt")  # the distilled stage's last good epoch
    assert load_sealed(state)["epoch"] == 1

    monkeypatch.setattr(KD, "forward", forward)  # the cause fixed: the same command resumes
    result = pipeline.run(cfg, tmp_path / "run")
    assert [r["role"] for r in result["rows"]] == ["teacher", "scratch", "distilled"]
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert len(metrics) == 3 * 3 * 3 and not metrics.duplicated(["stage", "epoch", "split"]).any()
