"""What kdrun prints when its output goes to a file: one plain line per stage instead of
progress bars' carriage returns; a sweep's console gets one line per job and the report,
each job's table going to its own kdrun.log; no deprecation warnings from Hydra."""

from __future__ import annotations

import os
import subprocess

import pandas as pd
import pytest

from tests.helpers import KDRUN

FAST = ["repeats=2", "trainer.epochs=2", "split.max_train=400", "split.max_test=200",
        "dataset.unlabeled=300", "num_threads=1"]


def kdrun(cwd, *args) -> str:
    """stdout and stderr together, as `kdrun ... > log.txt 2>&1` writes them."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    out = subprocess.run([KDRUN, *args], cwd=cwd, env=env, text=True, timeout=300,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert out.returncode == 0, out.stdout[-3000:]
    return out.stdout


@pytest.mark.slow  # make test under 5 minutes (it runs in CI's test-slow)
def test_a_run_logged_to_a_file_has_one_line_per_stage_and_no_carriage_returns(tmp_path):
    log = kdrun(tmp_path, *FAST, "progress=true")
    assert "\r" not in log
    stages = [line for line in log.splitlines() if ": epoch 2/2, loss " in line]
    assert [line.split(":")[0] for line in stages] == [
        "teacher seed 0", "scratch seed 0", "distilled seed 0", "scratch seed 1",
        "distilled seed 1"]
    assert "gain (best val)" in log  # the table
    assert not [line for line in kdrun(tmp_path, *FAST, "progress=false").splitlines()
                if ": epoch " in line]


@pytest.mark.slow  # a sweep's console, ~14 s (make test < 5 min)
def test_kdrun_m_batches_by_default_and_prints_one_line_per_job_then_the_report(tmp_path):
    """Without naming a launcher the students train stacked (hydra/launcher=basic: one
    at a time), and either way the console has one line per job and the report."""
    for launcher, students in (("default", "a stacked batch of"), ("basic", "alone")):
        (tmp_path / launcher).mkdir()
        named = [] if launcher == "default" else [f"hydra/launcher={launcher}"]
        log = kdrun(tmp_path / launcher, "-m", *named, "loss.T=2,4", *FAST)
        (summary,) = (tmp_path / launcher).glob("outputs/multirun/*/*/summary.csv")
        trained_in = pd.read_csv(summary).query("role != 'teacher'").trained_in
        assert trained_in.str.startswith(students).all() and len(trained_in) == 2 * 4
        if launcher == "default":  # 2 scratch, then 4 distilled students (with a transfer
            # set they train on more examples: a group of their own)
            assert "training 2 students as one stacked model" in log
            assert "training 4 students as one stacked model" in log
        jobs = [line for line in log.splitlines() if line.startswith("job ")]
        assert len(jobs) == 2 and all("gain" in line and "distilled" in line for line in jobs)
        assert "role       model" not in log and "\r" not in log  # tables: in kdrun.log
        assert "#0 :" not in log  # the launcher's own line per job
        report = log.split("sweep report: ", 1)[1].splitlines()
        assert [line.split(":")[0].strip() for line in report[1:3]] == ["loss.T=2", "loss.T=4"]
        (job_log,) = (tmp_path / launcher).glob("outputs/multirun/*/*/*loss.T=2,*/kdrun.log")
        assert "gain (best val)" in job_log.read_text()


@pytest.mark.slow  # joblib's worker processes take a while to start
def test_the_joblib_launcher_shows_no_hydra_deprecation_warnings(tmp_path):
    log = kdrun(tmp_path, "-m", "hydra/launcher=joblib", "loss.T=2,4", *FAST)
    assert "deprecated" not in log and "Warning" not in log
    assert len([line for line in log.splitlines() if line.startswith("job ")]) == 2


@pytest.mark.slow  # a run interrupted, then resumed to its end
def test_ctrl_c_prints_one_line_marks_the_run_and_mlflow_and_the_same_command_resumes(tmp_path):
    import json
    import signal
    import time

    from mlflow.tracking import MlflowClient

    args = [KDRUN, *FAST, "repeats=1", "trainer.teacher_epochs=300", "logger=mlflow",
            "progress=false", "hydra.run.dir=run"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    # Ctrl-C's default action in the child, whatever this process inherited: a background
    # job without job control (`make test-slow &` in a script) ignores SIGINT, and a Python
    # started with SIGINT ignored keeps ignoring it (the run then ends as if never stopped)
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = tmp_path / "run" / "metrics.csv"
    deadline = time.monotonic() + 120
    # an epoch's rows are written before its state is saved, so the rows of epoch 3 (3 rows
    # an epoch after the header) mean the state of epoch 2 is on disk: the resume point
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) > 9:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdrun: interrupted in teacher seed 0, after "
                                                   "epoch "), err
    assert lines[0].endswith("; run the same command to resume")
    mark = json.loads((tmp_path / "run" / "interrupted.json").read_text())
    assert mark["interrupted_at"].startswith("teacher seed 0")
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # kdrun's default store, read back here
    client = MlflowClient(tracking_uri=(tmp_path / "outputs" / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("kdrun").experiment_id])
    assert run.info.status == "KILLED"

    subprocess.run(args, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [e["from_epoch"] for e in events if e["event"] == "resumed"][0] >= 2
    assert not (tmp_path / "run" / "interrupted.json").exists()
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    epochs = pd.read_csv(metrics).query("stage == 'teacher' and split == 'train'").epoch
    assert sorted(epochs) == list(range(1, 301))  # every epoch once
