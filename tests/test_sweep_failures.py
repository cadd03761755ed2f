"""A sweep's failed job: the other jobs finish, the report lists the failure with its
line, the sweep exits 1; on a Slurm without accounting, one line instead of a warning
per status poll."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import KDRUN
from tests.test_sweep import FAST


@pytest.mark.slow  # make test under 5 minutes (it runs in CI's test-slow)
def test_a_failed_job_is_listed_in_the_report_and_the_others_finish(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([KDRUN, "-m", "trainer.lr=1e30,0.01", *FAST,
                           "hydra.sweep.dir=outputs/sweep"], cwd=tmp_path, env=env,
                          text=True, capture_output=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kdrun: error: 1 job(s) of the sweep failed, first ")
    assert "trainer.lr=1e+30: teacher stage diverged at epoch 1" in last
    sweep = tmp_path / "outputs" / "sweep"
    assert len(list(sweep.rglob("done.json"))) == 1  # the job after the failed one ran
    report = (sweep / "report.md").read_text()
    assert "1 of 2 started jobs finished, 1 failed (listed below)" in report
    failed = report.split("## Failed jobs", 1)[1]
    assert "trainer.lr=1e+30" in failed and "lower trainer.lr" in failed


QUIET = """
import logging, sys
from submitit.slurm.slurm import SlurmInfoWatcher
from kdrun.sweep.slurm_logs import quiet_submitit
logging.basicConfig(level=logging.INFO, format="%(message)s")
quiet_submitit()
watcher = SlurmInfoWatcher(delay_s=0)
watcher.register_job("12")
print([watcher._make_command() for _ in range(3)])
"""


@pytest.mark.parametrize("works", [False, True])
def test_sacct_is_tried_once_when_slurm_accounting_is_off(tmp_path, works):
    pytest.importorskip("submitit")
    sacct = tmp_path / "sacct"
    sacct.write_text("#!/bin/sh\necho 'Slurm accounting storage is disabled' >&2\nexit 1\n"
                     if not works else "#!/bin/sh\necho 'JobID|State|NodeList'\n")
    sacct.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-c", QUIET], env=env, text=True,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    commands = proc.stdout.strip()
    if works:
        assert commands.count("'sacct'") == 3 and "accounting is off" not in proc.stderr
    else:
        assert commands == "[None, None, None]"
        assert proc.stderr.count("Slurm accounting is off here") == 1
        assert "storage is disabled" not in proc.stderr + proc.stdout
