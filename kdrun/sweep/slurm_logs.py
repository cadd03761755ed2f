"""Quiet submitit on a Slurm without accounting. There ``sacct`` fails at every status
poll: it prints "Slurm accounting storage is disabled" and submitit logs a warning,
dozens of each per sweep, while submitit learns that a job ended from its result file
anyway. kdrun asks ``sacct`` once: if it fails, one line says so and submitit stops
asking (a job then counts as done when its result file is written, as before)."""

from __future__ import annotations

import logging
import subprocess

log = logging.getLogger("kdrun")
NO_ACCOUNTING = ("Slurm accounting is off here (sacct fails): kdrun reads the jobs' states "
                 "from submitit's result files instead of polling sacct")


def quiet_submitit() -> None:
    """Wrap submitit's sacct command so that it is tried once; harmless twice."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    if getattr(SlurmInfoWatcher, "kdrun_quiet", False):
        return
    make_command = SlurmInfoWatcher._make_command
    accounting: list[bool] = []  # empty until sacct has been tried

    def command_if_accounting(self):
        command = make_command(self)
        if command is None or accounting == [True]:
            return command
        if not accounting:
            accounting.append(subprocess.run(command, capture_output=True).returncode == 0)
            if not accounting[0]:
                log.warning(NO_ACCOUNTING)
        return command if accounting[0] else None

    SlurmInfoWatcher._make_command = command_if_accounting
    SlurmInfoWatcher.kdrun_quiet = True
