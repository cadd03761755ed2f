"""Sweeps and the stage cache: one teacher per sweep, locks under parallel jobs,
resume after kill -9, skipping finished jobs, and the sweep report."""

import json
import os
import signal
import subprocess
import time

import pandas as pd
import pytest
import torch

from kdrun.losses import CE
from kdrun.run import pipeline, provenance
from kdrun.store.cache import stage_key
from kdrun.store.files import load_checkpoint
from kdrun.sweep.report import main as kdrun_report
from tests.helpers import KDRUN, fit_or_snapshot, make_config

FAST = ["progress=false", "repeats=1", "trainer.epochs=2", "split.max_train=400",
        "split.max_test=200", "num_threads=1"]


def kdrun(cwd, *args, wait=True):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen([KDRUN, *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out + err


def events(*run_dirs) -> list[dict]:
    lines = []
    for d in run_dirs:
        path = d / "events.jsonl"
        lines += [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return lines


def count(evts, event, stage):
    return sum(e["event"] == event and e["stage"] == stage for e in evts)


def test_sweep_trains_teacher_once_writes_report_and_skips_finished_jobs(tmp_path):
    # Hydra's basic launcher, one job after another (the default, batched, in test_batched)
    kdrun(tmp_path, "-m", "hydra/launcher=basic", "loss.T=1,4", "loss.alpha=0.5,0.9", *FAST)
    (sweep,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    jobs = sorted(d for d in sweep.iterdir() if d.is_dir())
    rest = "repeats=1,split.max_test=200,split.max_train=400,trainer.epochs=2"  # no progress=...
    assert [j.name for j in jobs] == [f"loss.T={t},loss.alpha={a},num_threads=1,{rest}"
                                      for t in (1, 4) for a in (0.5, 0.9)]
    evts = events(*jobs)
    assert count(evts, "trained", "teacher") == 1 and count(evts, "reused", "teacher") == 3
    assert count(evts, "trained", "scratch") == 1 and count(evts, "trained", "distilled") == 4
    # every job's metrics carry the reused teacher rows, marked as such
    metrics = pd.read_csv(jobs[3] / "metrics.csv")
    assert metrics[metrics.stage == "teacher"].reused.all()
    assert not metrics[metrics.stage == "distilled"].reused.any()

    for name in ("summary.csv", "report.md", "gain_heatmap.png", "curves.png"):
        assert (sweep / name).stat().st_size > 0
    summary = pd.read_csv(sweep / "summary.csv")
    assert len(summary) == 4 * 3
    assert {"job", "role", "seed", "T", "alpha", "test_metric_best_val", "val_metric_best",
            "reused",
            "soft_target_entropy"} <= set(summary.columns)
    report = (sweep / "report.md").read_text()
    assert "selected on validation accuracy" in report and "| 4 | 0.9 |" in report
    assert "How soft the teacher's targets were" in report

    # kdrun-report on the same directory reproduces the same summary
    (sweep / "summary.csv").unlink()
    assert kdrun_report([str(sweep)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(sweep / "summary.csv"), summary)

    # the same sweep again into the same directory: every job is already finished
    out = kdrun(tmp_path, "-m", "hydra/launcher=basic", "loss.T=1,4", "loss.alpha=0.5,0.9",
                *FAST, f"hydra.sweep.dir={sweep}")
    assert out.count("this run already finished") == 4
    assert len(events(*jobs)) == len(evts)


@pytest.mark.slow  # four processes at once: minutes on a loaded 2-core machine
def test_four_parallel_jobs_on_an_empty_cache_train_one_teacher(tmp_path):
    args = [*FAST, "trainer.teacher_epochs=30", "split.max_train=2000"]
    alphas = (0.3, 0.5, 0.7, 0.9)
    procs = [kdrun(tmp_path, f"loss.alpha={a}", f"hydra.run.dir=run{a}", *args, wait=False)
             for a in alphas]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    evts = events(*(tmp_path / f"run{a}" for a in alphas))
    assert count(evts, "trained", "teacher") == 1 and count(evts, "reused", "teacher") == 3
    assert count(evts, "trained", "scratch") == 1 and count(evts, "trained", "distilled") == 4
    for a in alphas:
        summary = pd.read_csv(tmp_path / f"run{a}" / "summary.csv")
        assert list(summary.role) == ["teacher", "scratch", "distilled"]
        assert summary.test_metric_best_val.notna().all()
        metrics = pd.read_csv(tmp_path / f"run{a}" / "metrics.csv")
        assert not metrics.duplicated(["stage", "seed", "epoch", "split"]).any()
        assert len(metrics) == 3 * (30 + 2 + 2)
    assert not list((tmp_path / "outputs" / "cache").rglob(".*.tmp*"))


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel_with_one_teacher(tmp_path):
    kdrun(tmp_path, "-m", "hydra/launcher=joblib", "loss.alpha=0.5,0.9",
          "trainer.teacher_epochs=20", *FAST)  # kdrun's preset: one job per core here
    (sweep,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    evts = events(*[d for d in sweep.iterdir() if d.is_dir()])
    assert count(evts, "trained", "teacher") == 1 and count(evts, "reused", "teacher") == 1
    assert len(pd.read_csv(sweep / "summary.csv")) == 2 * 3
    for name in ("report.md", "gain_vs_loss.alpha.png", "curves.png"):  # one numeric key
        assert (sweep / name).stat().st_size > 0


def test_sweep_and_run_dirs_have_sub_second_names():
    """Two sweeps started in the same second must not share a directory."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("kdrun.configs", version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    raw = OmegaConf.to_container(cfg.hydra, resolve=False)
    assert raw["sweep"]["dir"].endswith("${now:%H-%M-%S.%f}")
    assert raw["run"]["dir"].endswith("${now:%H-%M-%S.%f}")
    assert raw["sweep"]["subdir"] == "${hydra.job.override_dirname}"


@pytest.mark.slow  # polls a running process; test_faults kills at exact points instead
def test_run_killed_during_distillation_resumes_without_redoing_epochs(tmp_path):
    args = ["progress=false", "repeats=1", "num_threads=1", "trainer.teacher_epochs=3",
            "trainer.student_epochs=100", "split.max_train=1000", "hydra.run.dir=run"]
    proc = kdrun(tmp_path, *args, wait=False)
    metrics = tmp_path / "run" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until distillation is a few epochs in
        if metrics.exists() and metrics.read_text().count("\ndistilled,") >= 3 * 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_rows = metrics.read_text().count("\ndistilled,")
    assert 0 < killed_rows < 3 * 100, "the kill did not land during distillation"

    kdrun(tmp_path, *args)
    evts = events(tmp_path / "run")
    assert count(evts, "reused", "teacher") == 1 and count(evts, "reused", "scratch") == 1
    (resumed,) = [e for e in evts if e["event"] == "resumed"]
    assert resumed["stage"] == "distilled" and resumed["from_epoch"] >= 4
    m = pd.read_csv(metrics)
    assert not m.duplicated(["stage", "seed", "epoch", "split"]).any()
    assert len(m) == 3 * (3 + 100 + 100)
    distilled = m[m.stage == "distilled"]
    assert sorted(set(distilled.epoch)) == list(range(1, 101))
    assert distilled[distilled.epoch <= resumed["from_epoch"]].reused.all()
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "distilled.pt")["epoch"] == 100


def test_resumed_fit_ends_exactly_where_an_uninterrupted_fit_does(tmp_path):
    cfg = make_config("dataset=synthetic", "dataset.n=300", "teacher=mlp", "student.dropout=0.2",
                      "trainer.schedule=cosine", "progress=false")
    data = pipeline.load_data(cfg.dataset, cfg.split)

    def train(resume=None, stop_at=None):
        torch.manual_seed(0)
        model = pipeline.build_model(cfg.student, data.input_shape, data.num_classes)
        state = fit_or_snapshot(model, data, CE(), cfg.trainer, stage="scratch", epochs=6,
                                resume=resume, stop_at=stop_at)
        return state if stop_at else (model, state)

    full_model, full = train()
    state = train(stop_at=3)
    torch.save(state, tmp_path / "s.pt")  # through disk, as after a kill
    resumed_model, resumed = train(resume=torch.load(tmp_path / "s.pt", weights_only=True))
    assert (resumed.best_epoch, resumed.test_metric_last) == \
        (full.best_epoch, full.test_metric_last)
    for k, v in full_model.state_dict().items():
        assert torch.equal(v, resumed_model.state_dict()[k])


def stage_keys(tmp_path, *overrides):
    cfg = make_config(*overrides)
    numerics = provenance.numerics(cfg.trainer, torch.device("cpu"))
    data = cfg.dataset.name  # stands in for the data's content digest
    return tuple(stage_key(provenance.stage_material(
        cfg, role=role, model_cfg=model, seed=cfg.seed, epochs=5, numerics=numerics,
        data_digest=data)) for role, model in (("teacher", cfg.teacher), ("scratch", cfg.student)))


@pytest.mark.parametrize("override,teacher_same,scratch_same", [
    ("loss.T=8", True, True),
    ("loss.alpha=0.1", True, True),
    ("loss=ce", True, True),
    ("student.hidden=[50]", True, False),
    ("teacher.channels=[64,64,64]", False, True),
    ("dataset=digits", False, False),
    ("seed=1", False, False),
    ("trainer.lr=0.001", False, False),
    ("trainer.student_epochs=7", True, True),  # resolved epochs are passed separately
    # extra unlabelled data changes only the distilled student (its key holds the transfer
    # set's hash); a label budget changes what every stage learns from
    ("dataset.unlabeled=100", True, True),
    ("split.labeled=100", False, False),
])
def test_cache_keys_depend_on_exactly_what_decides_the_stage(tmp_path, override, teacher_same,
                                                             scratch_same):
    base_teacher, base_scratch = stage_keys(tmp_path)
    teacher, scratch = stage_keys(tmp_path, override)
    assert (teacher == base_teacher) == teacher_same
    assert (scratch == base_scratch) == scratch_same


def test_finished_run_dir_refuses_another_config(tmp_path):
    cfg = make_config("dataset=synthetic", "dataset.n=200", "teacher=mlp", "repeats=1",
                      "trainer.epochs=1", "progress=false", f"cache.dir={tmp_path}/cache")
    pipeline.run(cfg, tmp_path / "run")
    assert pipeline.run(cfg, tmp_path / "run")["rows"]  # same config: returns the stored result
    other = make_config("dataset=synthetic", "dataset.n=200", "teacher=mlp", "repeats=1",
                        "trainer.epochs=2", "progress=false", f"cache.dir={tmp_path}/cache")
    with pytest.raises(pipeline.UserError, match="already holds a finished run of another config"):
        pipeline.run(other, tmp_path / "run")


def test_bring_your_own_teacher_skips_training_and_is_evaluated(tmp_path):
    base = ["dataset=synthetic", "dataset.n=300", "teacher=mlp", "teacher.hidden=[32]",
            "repeats=1", "trainer.epochs=3", "progress=false", f"cache.dir={tmp_path}/cache"]
    first = pipeline.run(make_config(*base), tmp_path / "a")["rows"][0]
    own = tmp_path / "a" / "checkpoints" / "teacher.pt"
    cfg = make_config(*base, f"teacher.checkpoint={own}", "loss.T=2")
    rows = pipeline.run(cfg, tmp_path / "b")["rows"]
    assert rows[0]["test_metric_best_val"] == pytest.approx(first["test_metric_best_val"])
    assert rows[0]["epochs"] == 0
    assert [e["event"] for e in events(tmp_path / "b")][0] == "given"


@pytest.mark.parametrize("problem,message", [
    ("missing", "no such file"),
    ("garbage", "not a loadable weights-only PyTorch checkpoint"),
    ("wrong_shape", "layer fc0.weight has shape [64, 10] in the checkpoint but [32, 10]"),
])
def test_bad_teacher_checkpoints_are_named(tmp_path, problem, message):
    path = tmp_path / "teacher.pt"
    if problem == "garbage":
        path.write_bytes(b"not a checkpoint")
    if problem == "wrong_shape":
        other = pipeline.build_model(make_config("teacher=mlp", "teacher.hidden=[64]").teacher,
                                     (10,), 5)
        torch.save({"model": other.state_dict()}, path)
    cfg = make_config("dataset=synthetic", "dataset.n=200", "dataset.dim=10", "teacher=mlp",
                      "teacher.hidden=[32]", f"teacher.checkpoint={path}", "progress=false",
                      f"cache.dir={tmp_path}/cache")
    with pytest.raises(pipeline.UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        pipeline.run(cfg, tmp_path / "run")


@pytest.mark.parametrize("classes,ok", [(10, True), (5, False)])
def test_a_resnet18_checkpoint_is_the_teacher(tmp_path, classes, ok):
    import torchvision

    net = torchvision.models.resnet18(num_classes=classes)
    net.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    torch.save(net.state_dict(), tmp_path / "resnet18.pt")  # a plain state dict, as users have
    cfg = make_config("dataset=digits", "teacher=resnet18", f"teacher.checkpoint={tmp_path}/"
                      "resnet18.pt", "student=mlp", "repeats=1", "trainer.epochs=1",
                      "progress=false", f"cache.dir={tmp_path}/cache")
    if not ok:
        with pytest.raises(pipeline.UserError, match=r"fc.weight has shape \[5, 512\]"):
            pipeline.run(cfg, tmp_path / "run")
        return
    rows = pipeline.run(cfg, tmp_path / "run")["rows"]
    assert rows[0]["epochs"] == 0 and rows[0]["params"] == sum(p.numel() for p in net.parameters())
    assert [e["event"] for e in events(tmp_path / "run")][0] == "given"
