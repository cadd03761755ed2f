"""Sweeps: the batched launcher's plan (batched.py), how jobs are composed and fitted to
their launcher (compose.py, launch.py), the sweep report read from the job folders
(jobs.py), analysed (analysis.py) and rendered (report.py, plots.py), published numbers
(published.py), Slurm jobs as kdrun watches them (slurm_jobs.py)."""
