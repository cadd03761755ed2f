"""How kdrun watches the jobs of hydra/launcher=submitit_slurm (and submitit_local).

- **A Slurm without accounting**: there ``sacct`` fails at every status poll, and
  submitit logs a warning each time. kdrun asks ``sacct`` once; if it fails, one line
  says so, submitit stops asking, and kdrun watches the queue with ``squeue`` instead.
- **A job that ends without a result**: killed before submitit's handlers were in place
  (a requeued job signalled early exits 140), by its node, or by its memory limit.
  submitit then waits for its result file forever (no accounting) or raises a multi-line
  error that ends the sweep without a report. kdrun counts such a job as failed, once it
  has left the queue for ``slurm.vanished_after_s`` with no result file: its folder gets
  a failed.json with one line, and the sweep goes on and reports it as any failed job.
"""

from __future__ import annotations

import getpass
import logging
import subprocess
import sys
import time

log = logging.getLogger("kdrun")
NO_ACCOUNTING = ("Slurm accounting is off here (sacct fails): kdrun reads the jobs' states "
                 "from squeue and submitit's result files instead of polling sacct")
# squeue's states of a job that is still in the queue (one that ended is not listed)
QUEUED = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
          "REQUEUE_FED", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
          "RESV_DEL_HOLD", "SPECIAL_EXIT"}


class SlurmQueue:
    """Which jobs are in the queue, asked of ``squeue`` at most every ``poll_s`` seconds;
    how long a job has been missing from it (0 while it is there, or unknown)."""

    def __init__(self, poll_s: float = 10.0):
        self.poll_s, self.asked = poll_s, float("-inf")
        self.missing_since: dict[str, float] = {}
        self.queued: set[str] | None = None

    def left_for(self, job_id: str) -> float:
        if time.monotonic() - self.asked >= self.poll_s:
            self.queued, self.asked = in_queue(), time.monotonic()
        if self.queued is None or job_id in self.queued:  # squeue failed, or it is there
            self.missing_since.pop(job_id, None)
            return 0.0
        return time.monotonic() - self.missing_since.setdefault(job_id, time.monotonic())


def in_queue() -> set[str] | None:
    """The ids of this user's jobs in the queue (array tasks as 123_4), or None when
    squeue cannot say."""
    try:
        out = subprocess.run(["squeue", "--noheader", "--array", "--format=%i|%T",
                              f"--user={getpass.getuser()}"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    rows = (line.split("|") for line in out.stdout.splitlines() if "|" in line)
    return {job.strip() for job, state in rows if state.strip() in QUEUED}


def watch_submitit(vanished_after_s: float) -> None:
    """Install kdrun's watch on submitit's jobs (harmless twice)."""
    from submitit.core.core import Job
    from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

    if getattr(Job, "kdrun_watched", False):
        return
    accounting: list[bool] = []  # empty until sacct has been tried
    queue = SlurmQueue(poll_s=min(10.0, max(vanished_after_s / 4, 0.2)))
    make_command, done, results = SlurmInfoWatcher._make_command, SlurmJob.done, Job.results

    def command_if_accounting(self):
        command = make_command(self)
        if command is None or accounting == [True]:
            return command
        if not accounting:
            accounting.append(subprocess.run(command, capture_output=True).returncode == 0)
            if not accounting[0]:
                log.warning(NO_ACCOUNTING)
        return command if accounting[0] else None

    def vanished(job) -> bool:
        return isinstance(job, SlurmJob) and accounting == [False] and \
            not job.paths.result_pickle.exists() and \
            queue.left_for(job.job_id) >= vanished_after_s

    def done_or_vanished(self, force_check: bool = False) -> bool:
        return done(self, force_check) or vanished(self)

    def results_or_failure(self):
        from submitit.core.utils import UncompletedJobError

        self.wait()  # for its result file or, without accounting, its leaving the queue
        if vanished(self):
            return [failed_job(self, f"left the queue without a result (not back within "
                                     f"slurm.vanished_after_s={vanished_after_s:g})")]
        try:
            return results(self)
        except UncompletedJobError:
            return [failed_job(self, f"ended without a result (state {self.state})")]

    SlurmInfoWatcher._make_command = command_if_accounting
    SlurmJob.done = done_or_vanished
    Job.results = results_or_failure
    Job.kdrun_watched = True


def failed_job(job, what: str):
    """A job that never reported: its folder gets failed.json with one line, and Hydra
    gets what a failed kdrun job returns (NaN, a failed trial for Optuna)."""
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import open_dict

    from kdrun.store.files import RunDir

    submission = job.submission()  # (the launcher, (overrides, dir key, job number, ...))
    launcher, (overrides, _, number, *_) = submission.function, submission.args
    cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config,
                                                                 list(overrides))
    with open_dict(cfg):
        cfg.hydra.job.num = number
    folder = f"{cfg.hydra.sweep.dir}/{cfg.hydra.sweep.subdir}"
    line = (f"{'Slurm' if 'slurm' in type(job).__name__.lower() else 'local'} job "
            f"{job.job_id} {what}: killed before kdrun could start or report (a signal, its "
            f"node or its memory limit); its log: {job.paths.stderr}")
    RunDir(folder).mark_failed(line)
    print(f"kdrun: error: job {cfg.hydra.job.override_dirname or f'#{number}'}: {line}",
          file=sys.stderr, flush=True)
    return JobReturn(overrides=list(overrides), cfg=cfg, hydra_cfg=cfg, working_dir=folder,
                     task_name=cfg.hydra.job.name, status=JobStatus.COMPLETED,
                     _return_value=float("nan"))
