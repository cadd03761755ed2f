"""README's recipes and the scale-out presets: every `kdrun` line of the Recipes
section composes and validates; the launcher presets resolve to what they promise;
a 2-job joblib sweep, a 2-job submitit_local sweep and a 4-trial Optuna search run
on the default data and end with the sweep report; logger=tensorboard writes events."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from kdrun.cli.preflight import preflight
from kdrun.errors import UserError
from kdrun.sweep import launch
from tests.helpers import KDRUN, slurm_commands_on_path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["progress=false", "repeats=1", "trainer.epochs=1", "split.max_train=300",
        "split.max_test=100", "num_threads=1"]


def readme_recipes() -> list[list[str]]:
    """The argument lists of the `kdrun ...` lines in README's Recipes section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Recipes", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "kdrun":
                commands.append(words[1:])
    return commands


def test_readme_has_the_six_recipes():
    text = (ROOT / "README.md").read_text().split("## Recipes", 1)[1].split("\n## ", 1)[0]
    for title in ("Run one experiment", "Sweep T x alpha x seeds", "Bring your own teacher",
                  "Run on SLURM", "Search T and alpha with Optuna", "Read the report"):
        assert f"**{title}" in text
    assert len(readme_recipes()) >= 8


# Recipes that need a file of the user's, weights or a tracking server this offline
# machine cannot have: they compose, and stop at validation with the line a user would
# see here.
NEEDS_FILES = {".pretrained=true": "are not in the local cache",
               ".weights=": "no such file",
               "logger.tracking_uri=http": "logger.tracking_uri",
               "teacher.name=models/": "not a local folder"}


@pytest.mark.parametrize("argv", readme_recipes(), ids=lambda a: " ".join(a)[:60])
def test_every_readme_recipe_composes_and_validates(argv, tmp_path, monkeypatch):
    slurm_commands_on_path(monkeypatch, tmp_path)  # as on a cluster's login node
    expected = [message for key, message in NEEDS_FILES.items() if any(key in a for a in argv)]
    if not expected:
        preflight(argv)  # raises UserError on any bad key, value or missing plugin
        return
    with pytest.raises(UserError, match=expected[0]):
        preflight(argv)


def hydra_config(*overrides: str):
    with initialize_config_module("kdrun.configs", version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_slurm_preset_resolves_to_the_documented_submitit_parameters():
    cfg = hydra_config("hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                       "output_root=/shared/kd")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert launcher["partition"] == "gpu" and launcher["timeout_min"] == 60
    assert launcher["gpus_per_node"] == 1 and launcher["array_parallelism"] == 32
    sweep_dir = OmegaConf.to_container(cfg.hydra.sweep, resolve=True)["dir"]
    assert sweep_dir.startswith("/shared/kd/multirun/")
    assert launcher["submitit_folder"] == f"{sweep_dir}/.submitit/%j"
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    known = set(OmegaConf.structured(SlurmQueueConf).keys())
    assert set(launcher) <= known, set(launcher) - known  # every key is one submitit knows


@pytest.mark.parametrize("preset,plugin_config", [
    ("joblib", "hydra_plugins.hydra_joblib_launcher.config.JobLibLauncherConf"),
    ("submitit_local", "hydra_plugins.hydra_submitit_launcher.config.LocalQueueConf"),
])
def test_other_launcher_presets_compose_with_known_keys(preset, plugin_config):
    import importlib

    module, name = plugin_config.rsplit(".", 1)
    known = set(OmegaConf.structured(getattr(importlib.import_module(module), name)).keys())
    launcher = hydra_config(f"hydra/launcher={preset}").hydra.launcher
    assert set(launcher) <= known
    if preset == "joblib":
        assert launcher.n_jobs == launch.parallel_jobs() >= 1


def test_optuna_preset_maximises_validation_accuracy_over_t_and_alpha():
    cfg = hydra_config("hparams_search=kd_optuna")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert dict(sweeper.params) == {"loss.T": "interval(1.0, 10.0)",
                                    "loss.alpha": "interval(0.0, 1.0)"}
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"


def test_interval_search_spaces_are_checked_at_both_ends():
    preflight(["hparams_search=kd_optuna", "loss.alpha=interval(0, 1)"])
    with pytest.raises(UserError, match="loss.T=0.0"):
        preflight(["hparams_search=kd_optuna", "loss.T=interval(0, 4)"])


def test_a_missing_plugin_names_the_extra_to_install(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if "submitit" in name else find_spec(name, *a))
    with pytest.raises(UserError, match=r"pip install 'kdrun\[slurm\]'"):
        preflight(["-m", "hydra/launcher=submitit_slurm", "loss.T=1,2"])


def test_parallel_jobs_get_one_gpu_each_from_their_job_number(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    hydra_cfg = OmegaConf.create({"launcher": {"n_jobs": 4}, "job": {"num": 5}})
    assert launch.device_for_job("auto", hydra_cfg) == "cuda:1"
    assert launch.device_for_job("cpu", hydra_cfg) == "cpu"
    assert launch.device_for_job("cuda:3", hydra_cfg) == "cuda:3"
    single = OmegaConf.create({"launcher": {}, "job": {"num": 5}})
    assert launch.device_for_job("auto", single) == "auto"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert launch.device_for_job("auto", hydra_cfg) == "auto"


def kdrun(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    p = subprocess.run([KDRUN, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                       env={**env, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def the_sweep(cwd: Path, figure: str = "gain_heatmap.png") -> Path:
    """The sweep folder, with its report, ``figure`` (the gain figure that fits its swept
    keys) and curves."""
    (sweep,) = (cwd / "outputs" / "multirun").glob("*/*")
    for name in ("summary.csv", "report.md", figure, "curves.png"):
        assert (sweep / name).stat().st_size > 0, name
    return sweep


@pytest.mark.slow
def test_optuna_search_runs_four_trials_into_one_report(tmp_path):
    kdrun(tmp_path, "hparams_search=kd_optuna", "hydra.sweeper.n_trials=4",
          "hydra.sweeper.sampler.n_startup_trials=2", *TINY)
    sweep = the_sweep(tmp_path)
    summary = pd.read_csv(sweep / "summary.csv")
    distilled = summary[summary.role == "distilled"]
    assert len(distilled) == 4 and distilled[["T", "alpha"]].drop_duplicates().shape[0] == 4
    assert ((1 <= distilled["T"]) & (distilled["T"] <= 10)).all()
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == pytest.approx(distilled.val_metric_best.max())
    teachers = summary[summary.role == "teacher"]
    assert teachers.cache_key.nunique() == 1 and len(teachers) == 4  # one teacher, 4 trials


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path):
    kdrun(tmp_path, "-m", "hydra/launcher=submitit_local", "loss.alpha=0.5,0.9", *TINY)
    sweep = the_sweep(tmp_path, "gain_vs_loss.alpha.png")
    summary = pd.read_csv(sweep / "summary.csv")
    assert len(summary) == 2 * 3
    assert summary[summary.role == "teacher"].reused.sum() == 1  # one teacher for both jobs
    assert list(sweep.glob(".submitit/*/*_log.out"))


def test_tensorboard_logger_writes_the_metric_rows_as_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kdrun.run import pipeline
    from tests.helpers import make_config

    cfg = make_config("dataset=synthetic", "dataset.n=200", "dataset.dim=10", "teacher=mlp",
                      "teacher.hidden=[16]", "student.hidden=[8]", "trainer.epochs=2",
                      "repeats=1", "progress=false", "logger=tensorboard",
                      f"cache.dir={tmp_path}/cache")
    pipeline.run(cfg, tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "seed0"))
    events.Reload()
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    for stage in ("teacher", "scratch", "distilled"):
        scalars = events.Scalars(f"{stage}/val_score")
        expected = metrics[(metrics.stage == stage) & (metrics.split == "val")].score
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx(list(expected), abs=1e-4)
    assert "config" in "".join(events.Tags()["tensors"])
