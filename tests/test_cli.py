"""The installed `kdrun` and `kdrun-report` commands, run as a user runs them: as
subprocesses from an unrelated working directory."""

import os
import subprocess

import pandas as pd
import pytest

from kdrun.store.files import load_checkpoint
from tests.helpers import KDRUN

FAST = ["progress=false", "repeats=1", "trainer.epochs=1", "split.max_train=400",
        "split.max_test=200", "num_threads=1"]


def kdrun(cwd, *args, command=KDRUN, env=None):
    base = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env = {**base, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([command, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def test_default_pipeline_writes_its_files_from_any_directory(tmp_path):
    p = kdrun(tmp_path, *FAST)
    assert p.returncode == 0, p.stderr
    (run,) = (tmp_path / "outputs" / "runs").glob("*/*")
    metrics = pd.read_csv(run / "metrics.csv")
    assert {"stage", "seed", "epoch", "split", "loss", "score", "lr", "seconds", "T",
            "alpha"} <= set(metrics.columns)
    assert set(metrics.stage) == {"teacher", "scratch", "distilled"}
    assert set(metrics.split) == {"train", "val", "test"}
    summary = pd.read_csv(run / "summary.csv")
    assert list(summary.role) == ["teacher", "scratch", "distilled"]
    assert {"params", "size_mb", "test_metric_last", "test_metric_best_val", "train_seconds",
            "latency_ms_b1", "latency_ms_b256", "compression", "speedup_b1"} <= set(summary.columns)
    assert summary.compression[1] == pytest.approx(summary.params[0] / summary.params[1], rel=1e-3)
    for name in ("teacher", "scratch", "distilled"):
        assert "model" in load_checkpoint(run / "checkpoints" / f"{name}.pt")
    assert (run / ".hydra" / "config.yaml").exists()
    for word in ("teacher", "scratch", "distilled", "gain", "cnn[32,32,32]+fc[128]",
                 "mlp[100,100]", "metrics.csv"):
        assert word in p.stdout


@pytest.mark.parametrize("args,words", [
    (["dataset=foo"], ["dataset='foo'", "valid:", "mnist1d", "digits"]),
    (["loss.T=0"], ["loss.T=0", "> 0"]),
    (["loss.alpha=2"], ["loss.alpha=2", "<= 1"]),
    (["loss.Tx=3"], ["loss.Tx", "+loss.Tx"]),
    (["-m", "loss.T=1,0"], ["loss.T=0", "> 0"]),
])
def test_user_mistakes_get_one_line_exit_2_and_write_nothing(tmp_path, args, words):
    p = kdrun(tmp_path, *args)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdrun: error: "), p.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in p.stderr + p.stdout
    assert not (tmp_path / "outputs").exists()


def test_full_error_switch_shows_the_traceback(tmp_path):
    p = kdrun(tmp_path, "loss.T=0", env={"HYDRA_FULL_ERROR": "1"})
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_unwritable_output_root_is_refused_before_anything_is_written(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    p = kdrun(tmp_path, f"output_root={blocker}/runs")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("kdrun: error: output_root=") and "not a writable folder" in line
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("job", [
    ["loss.T=2", "loss.alpha=0.3", "seed=1"],
    ["loss=dkd", "loss.T=2", "loss.dkd_beta=4"],
    ["student.hidden=[50,50]", "teacher.checkpoint=null", "split.seed=${seed}"],
    ["dataset=digits", "dataset.augment.hflip=true", "trainer.lr=1e-3", "hydra.verbose=true"],
    ["+extra.key=1", "loss.T=3"],
])
def test_preflight_reuses_a_composition_exactly_as_hydra_composes_the_job(job):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from kdrun.cli.preflight import CONFIG_MODULE, _reuse_composition

    composed = {}
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        ours = _reuse_composition(job, compose, composed)
        hydras = compose("config", overrides=job)
        again = _reuse_composition([*job[:-1], job[-1]], compose, composed)
    assert OmegaConf.to_container(ours) == OmegaConf.to_container(hydras)
    assert OmegaConf.to_container(again) == OmegaConf.to_container(hydras)
    assert OmegaConf.is_struct(ours)


def test_preflight_leaves_a_misspelt_key_to_hydra():
    from hydra import compose, initialize_config_module

    from kdrun.cli.preflight import CONFIG_MODULE, _reuse_composition

    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        assert _reuse_composition(["loss.Tx=3"], compose, {}) is None
