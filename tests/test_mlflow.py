"""logger=mlflow, read back with MlflowClient: params, per-epoch metrics of every stage
and seed, artifacts; a sweep as a parent run with its children; a re-run, a resumed
sweep and a run killed mid-way continue their MLflow runs instead of duplicating them."""

from __future__ import annotations

import os
import signal
import time

import pytest

from kdrun.run import pipeline
from tests.helpers import make_config
from tests.test_sweep import FAST, kdrun

mlflow = pytest.importorskip("mlflow")


def client(root):
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    return mlflow.MlflowClient((root / "outputs" / "mlruns").resolve().as_uri())


def runs(root):
    c = client(root)
    experiment = c.get_experiment_by_name("kdrun")
    return c, (c.search_runs([experiment.experiment_id]) if experiment else [])


def history(c, run, key):
    return [(m.step, m.value) for m in c.get_metric_history(run.info.run_id, key)]


def test_a_run_logs_params_metrics_and_artifacts_and_a_rerun_continues_it(tmp_path):
    overrides = ["logger=mlflow", *FAST, "repeats=2", f"output_root={tmp_path}/outputs"]
    result = pipeline.run(make_config(*overrides), tmp_path / "outputs" / "run1")
    c, found = runs(tmp_path)
    assert len(found) == 1
    run = found[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.T"] == "4.0" and run.data.params["trainer.epochs"] == "2"
    assert run.data.params["dataset.name"] == "mnist1d"
    for stage, seeds in (("teacher", [0]), ("scratch", [0, 1]), ("distilled", [0, 1])):
        for seed in seeds:
            for split in ("train", "val", "test"):
                steps = [step for step, _ in history(c, run, f"{stage}/seed{seed}/{split}_score")]
                assert steps == [1, 2], (stage, seed, split)
    summary = {row["role"]: row for row in result["rows"] if row["seed"] == 0}
    last_val = history(c, run, "distilled/seed0/val_score")[-1][1]
    assert last_val == pytest.approx(pipeline_metric(tmp_path / "outputs" / "run1", "distilled", 0))
    gain = run.data.metrics["gain/test_metric_best_val"]
    rows = result["rows"]
    expected = (sum(r["test_metric_best_val"] for r in rows if r["role"] == "distilled")
                - sum(r["test_metric_best_val"] for r in rows if r["role"] == "scratch")) / 2
    assert gain == pytest.approx(expected) and summary["teacher"]["role"] == "teacher"
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert artifacts == {"summary.csv", "metrics.csv", "table.txt"}
    table = c.download_artifacts(run.info.run_id, "table.txt", str(tmp_path))
    assert open(table).read() == result["table"]

    pipeline.run(make_config(*overrides), tmp_path / "outputs" / "run2")  # the same run again
    c, again = runs(tmp_path)
    assert [r.info.run_id for r in again] == [run.info.run_id]
    assert [s for s, _ in history(c, again[0], "scratch/seed1/test_score")] == [1, 2]
    assert len(history(c, again[0], "gain/test_metric_best_val")) == 1


def pipeline_metric(run_dir, stage, seed):
    import pandas as pd

    rows = pd.read_csv(run_dir / "metrics.csv")
    rows = rows[(rows.stage == stage) & (rows.seed == seed) & (rows.split == "val")]
    return rows.score.iloc[-1]


@pytest.mark.slow  # a sweep and its resume, ~16 s (make test < 5 min)
def test_a_sweep_is_a_parent_run_with_one_child_per_job_and_resumes_in_place(tmp_path):
    sweep = "hydra.sweep.dir=outputs/sweep"
    args = ["-m", "logger=mlflow", "loss.T=2,4", *FAST, sweep]
    kdrun(tmp_path, *args)
    c, found = runs(tmp_path)
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert sorted(r.data.params["loss.T"] for r in children) == ["2", "4"]
    assert sorted(r.info.run_name.split(",")[0] for r in children) == ["loss.T=2", "loss.T=4"]
    report = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"report.md", "summary.csv", "gain_vs_loss.T.png", "curves.png"} <= report
    assert all(r.info.status == "FINISHED" for r in found)

    kdrun(tmp_path, *args)  # resumed in its own folder: the same three runs
    _, again = runs(tmp_path)
    assert sorted(r.info.run_id for r in again) == sorted(r.info.run_id for r in found)


@pytest.mark.slow
def test_a_run_killed_mid_way_continues_its_mlflow_run_without_duplicates(tmp_path):
    args = ["logger=mlflow", "progress=false", "repeats=1", "trainer.epochs=20",
            "split.max_train=400", "split.max_test=200", "num_threads=1",
            "hydra.run.dir=outputs/run"]
    proc = kdrun(tmp_path, *args, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and not logged_epochs(tmp_path, "teacher/seed0/val_score") >= 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = logged_epochs(tmp_path, "teacher/seed0/val_score")
    assert 3 <= killed_at < 20, "the run was not killed mid-way"
    kdrun(tmp_path, *args)
    c, found = runs(tmp_path)
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    for key in ("teacher/seed0/val_score", "scratch/seed0/train_loss",
                "distilled/seed0/test_score"):
        assert [s for s, _ in history(c, found[0], key)] == list(range(1, 21)), key


def logged_epochs(root, key: str) -> int:
    """Lines of a metric's file in the MLflow file store (one per logged step)."""
    files = list((root / "outputs" / "mlruns").glob(f"*/*/metrics/{key}"))
    return len(files[0].read_text().splitlines()) if files else 0


def test_a_tracking_uri_that_cannot_be_reached_stops_before_training_in_one_line(tmp_path):
    import socket
    import subprocess

    from tests.helpers import KDRUN

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    out = subprocess.run([KDRUN, "logger=mlflow", f"logger.tracking_uri=http://127.0.0.1:{port}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and time.monotonic() - started < 60
    assert out.stderr.count("\n") == 1 and "cannot be reached" in out.stderr
    assert f"logger.tracking_uri='http://127.0.0.1:{port}'" in out.stderr
    assert not (tmp_path / "outputs" / "runs").exists()  # nothing trained, nothing written


def test_a_server_that_never_answers_or_is_not_mlflow_is_refused_within_the_timeout():
    import http.server
    import socket
    import threading

    from kdrun.errors import ConfigError
    from kdrun.report.mlflow_log import CONNECT_TIMEOUT_S, check_reachable

    silent = socket.socket()  # accepts connections (the kernel's backlog), never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    started = time.monotonic()
    with pytest.raises(ConfigError, match="cannot be reached"):
        check_reachable(f"http://127.0.0.1:{silent.getsockname()[1]}")
    assert time.monotonic() - started < CONNECT_TIMEOUT_S + 2
    silent.close()

    class Answers(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200 if self.path.startswith("/api/2.0/mlflow/") else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    for prefix, ok in (("", True), ("/elsewhere", False)):
        server = http.server.HTTPServer(("127.0.0.1", 0), Answers)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        uri = f"http://127.0.0.1:{server.server_address[1]}{prefix}"
        try:
            if ok:
                check_reachable(uri)  # an MLflow-like answer: accepted
            else:
                with pytest.raises(ConfigError, match="not as an MLflow tracking server"):
                    check_reachable(uri)
        finally:
            server.shutdown()
