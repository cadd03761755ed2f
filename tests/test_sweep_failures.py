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
from kdrun.sweep.slurm_jobs import watch_submitit
logging.basicConfig(level=logging.INFO, format="%(message)s")
watch_submitit(180)
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


# A Slurm of four commands: sbatch runs the array tasks named in FAKE_SLURM_RUNS on this
# machine as Slurm would (the job script's srun line, with Slurm's variables) and drops the
# others, as a job killed before it starts; squeue lists the tasks still running; sacct
# says accounting is off.
SBATCH = '''#!{python}
import os, re, subprocess, sys
from pathlib import Path
here = Path(__file__).parent
script = Path(sys.argv[-1]).read_text()
command = re.search(r"^srun .* --error \\S+ (.*)$", script, re.M)[1].split()
for task in filter(None, os.environ.get("FAKE_SLURM_RUNS", "").split(",")):
    env = dict(os.environ, SLURM_JOB_ID="43" + task, SLURM_ARRAY_JOB_ID="4242",
               SLURM_ARRAY_TASK_ID=task, SLURM_PROCID="0", SLURM_NTASKS="1",
               SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_JOB_NUM_NODES="1",
               SLURM_JOB_NODELIST="localhost", SUBMITIT_EXECUTOR="slurm")
    with open(here / f"task{{task}}.out", "w") as out:
        job = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    (here / f"task{{task}}.pid").write_text(str(job.pid))
print("Submitted batch job 4242")
'''
SQUEUE = '''#!{python}
import os
from pathlib import Path
for pid_file in Path(__file__).parent.glob("task*.pid"):
    status = Path(f"/proc/{{pid_file.read_text()}}/status")
    if status.exists() and "State:\\tZ" not in status.read_text():
        print(f"4242_{{pid_file.stem[4:]}}|RUNNING")
'''


@pytest.mark.slow  # one job runs (~15 s)
def test_a_slurm_job_that_vanishes_is_reported_failed_and_the_others_finish(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    commands = {"sbatch": SBATCH, "squeue": SQUEUE, "srun": "#!/bin/sh\n",
                "scancel": "#!/bin/sh\n",
                "sacct": "#!/bin/sh\necho 'Slurm accounting storage is disabled' >&2\nexit 1\n"}
    for name, text in commands.items():
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_SLURM_RUNS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([KDRUN, "-m", "hydra/launcher=submitit_slurm", "loss.T=2,4", *FAST,
                           "device=cpu", "hydra.launcher.gpus_per_node=0",
                           "slurm.vanished_after_s=2", "hydra.sweep.dir=sweep"],
                          cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kdrun: error: 1 job(s) of the sweep failed, first device=cpu,"
                           "loss.T=2,")
    assert "Slurm job 4242_0 left the queue without a result (not back within " \
           "slurm.vanished_after_s=2)" in last
    sweep = tmp_path / "sweep"
    (done,) = [p.parent.name for p in sweep.rglob("done.json")]  # the other job finished
    assert "loss.T=4" in done
    report = (sweep / "report.md").read_text()
    assert "1 failed (listed below)" in report and "4242_0" in report.split("## Failed jobs")[1]


def test_submitit_slurm_where_slurm_is_not_is_one_line(monkeypatch):
    from kdrun.cli import preflight
    from kdrun.errors import ConfigError

    monkeypatch.setattr(preflight.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"^hydra/launcher='submitit_slurm' is invalid: "
                                          r"Slurm's sbatch and srun not found on PATH: run kdrun "
                                          r"on the cluster's login node"):
        preflight._check_slurm_commands(["hydra/launcher=submitit_slurm", "loss.T=2,4"])
    preflight._check_slurm_commands(["hydra/launcher=submitit_local"])  # needs no Slurm
