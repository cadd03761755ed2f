"""Several ``kdrun`` processes started at once on one stage cache, as a user's shell
loop or a cluster's array starts them: each stage is trained once, by whichever process
takes its lock first, and reused by the others; a process killed while it holds a lock
does not block the others, which take the stage over from its last saved epoch."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from kdrun.store.cache import verify_cache
from tests.helpers import KDRUN, run_events
from tests.test_faults import KILLER

ARGS = ["dataset=synthetic", "dataset.n=300", "dataset.dim=10", "teacher=mlp",
        "teacher.hidden=[32]", "student=mlp", "student.hidden=[8]", "trainer.epochs=3",
        "repeats=1", "progress=false", "num_threads=1"]


def start(cwd: Path, *overrides: str, kill_at: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "KDRUN_KILL_AT")}
    env["OMP_NUM_THREADS"] = "1"
    if kill_at:
        env.update(KDRUN_KILL_AT=kill_at, PYTHONPATH=os.pathsep.join(
            filter(None, [str(cwd / "killer"), env.get("PYTHONPATH")])))
    return subprocess.Popen([KDRUN, *ARGS, *overrides, f"cache.dir={cwd}/cache"], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, err = process.communicate(timeout=300)
    return process.returncode, err


@pytest.mark.slow  # three kdrun processes at once (~25 s on 2 cores)
def test_three_processes_at_once_train_each_stage_once(tmp_path):
    runs = {"a": ["loss.T=4"], "b": ["loss.T=4"], "c": ["loss.T=2"]}  # a, b: the same stages
    processes = [start(tmp_path, *overrides, f"hydra.run.dir=run_{name}")
                 for name, overrides in runs.items()]
    for process in processes:
        code, err = finish(process)
        assert code == 0, err
    done = [dict(e, run=name) for name in runs for e in run_events(tmp_path / f"run_{name}")]
    trained = pd.DataFrame([e for e in done if e["event"] == "trained"])
    # the teacher and the scratch student are every run's; a and b share their distilled one
    assert sorted(trained.stage) == ["distilled", "distilled", "scratch", "teacher"]
    assert trained.key.is_unique
    assert sum(e["event"] == "reused" for e in done) == 9 - 4
    for name in runs:
        summary = pd.read_csv(tmp_path / f"run_{name}" / "summary.csv")
        assert list(summary.role) == ["teacher", "scratch", "distilled"]
        assert summary.test_metric_best_val.notna().all()
    a, b = (pd.read_csv(tmp_path / f"run_{n}" / "summary.csv") for n in "ab")
    assert a.test_metric_best_val.tolist() == b.test_metric_best_val.tolist()
    assert verify_cache(tmp_path / "cache") == []


@pytest.mark.slow  # two kdrun processes, one killed holding the teacher's lock (~15 s)
def test_a_process_killed_holding_a_lock_does_not_block_the_others(tmp_path):
    (tmp_path / "killer").mkdir()
    (tmp_path / "killer" / "sitecustomize.py").write_text(KILLER)
    # its teacher's epoch 1 state is saved, epoch 2's rows written: then SIGKILL, lock held
    doomed = start(tmp_path, "trainer.epochs=4", "hydra.run.dir=run_doomed",
                   kill_at="rows:teacher:2")
    deadline = time.monotonic() + 120
    while not list((tmp_path / "cache").glob("*/rows.csv")):  # it holds the teacher's lock
        assert time.monotonic() < deadline and doomed.poll() is None
        time.sleep(0.05)
    other = start(tmp_path, "trainer.epochs=4", "hydra.run.dir=run_other")
    code, err = finish(doomed)
    assert code == -9 and "killing at rows:teacher:2" in err, err
    code, err = finish(other)
    assert code == 0, err
    teacher = [e for e in run_events(tmp_path / "run_other") if e["stage"] == "teacher"]
    assert [(e["event"], e.get("from_epoch")) for e in teacher] == [("resumed", 1),
                                                                    ("trained", None)]
    metrics = pd.read_csv(tmp_path / "run_other" / "metrics.csv")
    assert sorted(metrics[metrics.stage == "teacher"].epoch.unique()) == [1, 2, 3, 4]
    assert verify_cache(tmp_path / "cache") == []
