"""kdrun under a real slurmctld / slurmd (``make test-slurm`` brings the one-node cluster
up and sets KDRUN_TEST_SLURM=1): array jobs at once on one stage cache, a job cut off
by its time limit, requeued and resumed to the same weights, and a failed job reported
while the others finish."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.helpers import KDRUN

pytestmark = pytest.mark.skipif(os.environ.get("KDRUN_TEST_SLURM") != "1",
                                reason="needs the cluster of make test-slurm")
SLURM = ["-m", "hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_node=0",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "device=cpu",
         "num_threads=1", "progress=false"]
SMALL = ["repeats=1", "trainer.epochs=3", "split.max_train=1000", "split.max_test=300"]


def kdrun(cwd: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    start = time.perf_counter()
    proc = subprocess.run([KDRUN, *args], cwd=cwd, text=True, capture_output=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(f"\n$ kdrun {' '.join(args)}\n  exit {proc.returncode} after "
          f"{time.perf_counter() - start:.0f} s")
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def events(sweep: Path) -> pd.DataFrame:
    rows = [dict(json.loads(line), job=str(path.parent.relative_to(sweep)))
            for path in sweep.rglob("events.jsonl") for line in path.read_text().splitlines()]
    return pd.DataFrame(rows)


def test_array_jobs_at_once_share_one_stage_cache(tmp_path):
    sweep = tmp_path / "sweep"
    proc = kdrun(tmp_path, *SLURM, *SMALL, "hydra.launcher.array_parallelism=4",
                 "loss.T=2,4", "loss.alpha=0.5,0.9", f"hydra.sweep.dir={sweep}",
                 f"cache.dir={tmp_path}/cache")
    done = events(sweep)
    trained = done[done.event == "trained"]
    print(done.groupby(["stage", "event"]).size().to_string())
    assert (trained.stage == "teacher").sum() == 1 and (trained.stage == "scratch").sum() == 1
    assert (trained.stage == "distilled").sum() == 4
    assert len(list(sweep.rglob("done.json"))) == 4 and (sweep / "report.md").exists()
    logs = [p for p in sweep.rglob("*_log.out")]
    starts = sorted(p.stat().st_ctime for p in logs)
    print(f"  {len(logs)} Slurm job logs, started within {starts[-1] - starts[0]:.1f} s")
    sacct = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines()
             if "sacct" in line or "accounting" in line]
    assert len(sacct) == 1 and "accounting is off" in sacct[0], "\n".join(sacct)  # not one per poll


def test_a_job_cut_off_by_its_time_limit_is_requeued_and_resumes_to_the_same_weights(
        tmp_path):
    # ~0.12 s a teacher epoch here: ~45 s in all, cut by a 1-minute limit whose warning comes
    # 30 s early (Slurm then holds a requeued job ~2.5 min before it starts again)
    job = ["repeats=1", "dataset.unlabeled=0", "trainer.teacher_epochs=350",
           "trainer.student_epochs=1"]
    sweep = tmp_path / "sweep"
    kdrun(tmp_path, *SLURM, *job, "hydra.launcher.timeout_min=1",
          "hydra.launcher.signal_delay_s=30", "hydra.launcher.max_num_timeout=5",
          f"hydra.sweep.dir={sweep}", f"cache.dir={tmp_path}/cache")
    done = events(sweep)
    resumed = done[done.event == "resumed"]
    assert len(resumed) >= 1, "the job was not cut off by its time limit"
    print(f"  requeued and resumed from epochs {list(resumed.from_epoch)} of 350")
    assert (resumed.stage == "teacher").all()
    (run,) = [p.parent for p in sweep.rglob("done.json")]
    metrics = pd.read_csv(run / "metrics.csv")
    assert not metrics.duplicated(["stage", "seed", "epoch", "split"]).any()
    assert sorted(metrics[metrics.stage == "teacher"].epoch.unique()) == list(range(1, 351))

    kdrun(tmp_path, *job, "device=cpu", "num_threads=1", "progress=false",
          f"hydra.run.dir={tmp_path}/alone", f"cache.dir={tmp_path}/cache_alone")
    requeued = torch.load(run / "checkpoints" / "teacher.pt", weights_only=True)
    alone = torch.load(tmp_path / "alone" / "checkpoints" / "teacher.pt", weights_only=True)
    for key in ("model", "best_model"):
        for name, tensor in alone[key].items():
            assert torch.equal(requeued[key][name], tensor), (key, name)


def test_a_failed_job_is_reported_and_the_others_finish(tmp_path):
    sweep = tmp_path / "sweep"
    proc = kdrun(tmp_path, *SLURM, *SMALL, "hydra.launcher.array_parallelism=2",
                 "trainer.lr=0.01,1e30", f"hydra.sweep.dir={sweep}",
                 f"cache.dir={tmp_path}/cache", expect=1)
    assert "1 job(s) of the sweep failed" in proc.stderr and "diverged" in proc.stderr
    report = (sweep / "report.md").read_text()
    assert "1 of 2 started jobs finished, 1 failed" in report
    assert "## Failed jobs" in report and "teacher stage diverged" in report
    assert len(list(sweep.rglob("done.json"))) == 1


def test_a_job_of_two_tasks_trains_each_stage_on_two_processes(tmp_path):
    # hydra.launcher.tasks_per_node=2: Slurm starts the job twice; kdrun's processes meet
    # through gloo (submitit gives them the address), split every batch, and rank 0 writes
    sweep, cache = tmp_path / "sweep", f"cache.dir={tmp_path}/cache"
    two = [*SLURM, *SMALL, "hydra.launcher.tasks_per_node=2", "dataset.unlabeled=0",
           "trainer.float64=true"]
    kdrun(tmp_path, *two, "seed=0", f"hydra.sweep.dir={sweep}", cache)
    (run,) = [p.parent for p in sweep.rglob("done.json")]
    summary = pd.read_csv(run / "summary.csv")
    assert set(summary.processes) == {2} and set(summary.backend) == {"gloo"}
    assert len(list(sweep.rglob("summary.csv"))) == 2  # the job's, and the sweep's report
    log = (run / "kdrun.log").read_text()
    assert log.count("kdrun | dataset=") == 1  # rank 0's table only
    # one process then reuses every stage: the default pair's shards are the same maths
    kdrun(tmp_path, *SMALL, "dataset.unlabeled=0", "trainer.float64=true", "device=cpu",
          "num_threads=1", "progress=false", f"hydra.run.dir={tmp_path}/alone", cache)
    alone = pd.read_csv(tmp_path / "alone" / "summary.csv")
    assert alone.reused.all() and list(alone.cache_key) == list(summary.cache_key)


def test_a_job_killed_before_it_reports_ends_the_sweep_as_failed(tmp_path):
    # scancel --signal=KILL: the job leaves the queue with no result file, as one signalled
    # before submitit's handlers are in place; on this cluster without accounting only
    # squeue can tell
    sweep = tmp_path / "sweep"
    args = [KDRUN, *SLURM, "repeats=1", "dataset.unlabeled=0", "trainer.teacher_epochs=300",
            "trainer.student_epochs=1", "hydra.launcher.array_parallelism=2", "seed=0,1",
            "slurm.vanished_after_s=15", f"hydra.sweep.dir={sweep}",
            f"cache.dir={tmp_path}/cache"]
    login = subprocess.Popen(args, cwd=tmp_path, text=True, stderr=subprocess.PIPE,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while True:
        queue = subprocess.run(["squeue", "--noheader", "--array", "--format=%i|%T"],
                               capture_output=True, text=True).stdout.split()
        running = sorted(j.split("|")[0] for j in queue if j.endswith("|RUNNING"))
        if len(running) == 2:
            break
        assert time.monotonic() < deadline and login.poll() is None, queue
        time.sleep(1)
    subprocess.run(["scancel", "--signal=KILL", running[0]], check=True)
    _, err = login.communicate(timeout=600)
    assert login.returncode == 1, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "1 job(s) of the sweep failed" in last and f"Slurm job {running[0]} " in last
    report = (sweep / "report.md").read_text()
    assert "1 failed (listed below)" in report and running[0] in report
