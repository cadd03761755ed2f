"""The README's "Add your own loss / model" example, run exactly as written: a loss and
a model kept outside kdrun, with their YAML files in the user's own config folder."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pandas as pd

from tests.helpers import KDRUN

README = Path(__file__).parents[1] / "README.md"
TINY = ["progress=false", "repeats=1", "trainer.epochs=1", "split.max_train=300",
        "num_threads=1", "hydra.run.dir=run"]


def example() -> tuple[dict[str, str], list[str]]:
    """The section's files (each block's first line is ``# <path>``) and its command."""
    section = README.read_text().split("## Add your own loss / model")[1].split("\n## ")[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    files = {body.splitlines()[0][2:]: body.split("\n", 1)[1] for lang, body in blocks
             if lang in ("python", "yaml")}
    (command,) = [body.strip() for lang, body in blocks if lang == "bash"]
    return files, command.split()


def kdrun(cwd: Path, argv: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(cwd))
    args = [a.replace("$PWD", str(cwd)) for a in argv if not a.startswith("PYTHONPATH=")]
    assert args[0] == "kdrun"
    return subprocess.run([KDRUN, *args[1:], *TINY], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_readme_example_runs_a_users_own_loss_and_model_end_to_end(tmp_path):
    files, command = example()
    assert set(files) == {"my_kd/losses.py", "my_kd/models.py", "my_configs/loss/scaled_kd.yaml",
                          "my_configs/student/tiny.yaml"}
    write(tmp_path, files)
    p = kdrun(tmp_path, command)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = pd.read_csv(tmp_path / "run" / "summary.csv")
    assert list(summary.role) == ["teacher", "scratch", "distilled"]
    assert summary.arch[1] == "my_kd.models.tiny_mlp" and summary.params[1] == 40 * 16 + 16 + 170
    assert summary.method[2] == "my_kd.losses.ScaledKD"


def test_a_misspelt_key_in_a_users_loss_yaml_stops_before_training(tmp_path):
    files, command = example()
    files["my_configs/loss/scaled_kd.yaml"] += "gian: 3.0\n"
    write(tmp_path, files)
    p = kdrun(tmp_path, command)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "loss.gian" in lines[0] and "valid: T, gain" in lines[0]
    assert not (tmp_path / "run" / "metrics.csv").exists()
