"""Every benchmark script starts as its docstring and the README say to run it,
`python benchmarks/<script>.py`, from any folder (two of them once needed the repository
root on the import path, and failed as documented)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("[a-z]*.py"))


@pytest.mark.slow  # a torch import per script
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_benchmark_script_starts_as_documented(script, tmp_path):
    out = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout


@pytest.mark.slow  # two short trainings of a 4x128 GPT-2 (~20 s)
def test_the_real_text_benchmark_runs_both_loops_on_generated_text(tmp_path):
    pytest.importorskip("transformers")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_lm_text.py"
    out = subprocess.run([sys.executable, str(script), "--iters", "30", "--rounds", "2",
                          "--speed-steps", "10"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "kdrun / plain " in out.stdout and "round 2: plain " in out.stdout
    rows = out.stdout.split("| plain | kdrun\n")[1].strip().splitlines()
    assert rows and all(float(r.split("|")[1]) > 0 and float(r.split("|")[2]) > 0 for r in rows)
