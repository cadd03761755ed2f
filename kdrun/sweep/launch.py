"""Each job of a sweep as its launcher runs it: CPU threads (an equal share of the cores
when jobs run side by side) and the GPU it gets; the joblib preset's default job count."""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf


def parallel_jobs() -> int:
    """Default number of parallel jobs for the joblib launcher: one per GPU, or one per
    CPU core on a machine without one."""
    import torch

    return torch.cuda.device_count() or os.cpu_count() or 1


OmegaConf.register_new_resolver("kdrun_parallel_jobs", parallel_jobs, replace=True)


def fit_to_launcher(cfg: DictConfig, hydra_cfg) -> None:
    """The job's CPU threads and device, as its launcher runs it (the batched launcher's
    planning applies this too: the device is in every stage key)."""
    share = threads_per_job(hydra_cfg)
    if cfg.num_threads in (None, "auto") and share is not None:
        cfg.num_threads = share
    cfg.device = device_for_job(cfg.device, hydra_cfg)


def parallel_jobs_of(hydra_cfg) -> int:
    """How many jobs the launcher runs at once: 1 for Hydra's basic launcher (and
    launchers without ``n_jobs``), -1 for joblib's "one per core"."""
    launcher = hydra_cfg.get("launcher") or {}
    return launcher.get("n_jobs") or 1


def threads_per_job(hydra_cfg) -> int | None:
    """CPU threads for one job: torch's default alone, an equal share of the cores when
    a launcher runs several jobs at once (two 2-thread jobs on 2 cores run many times
    slower than one)."""
    parallel = parallel_jobs_of(hydra_cfg)
    if parallel == 1:
        return None
    import torch

    cores = os.cpu_count() or 1
    jobs = cores if parallel < 0 else min(parallel, cores)
    return max(1, min(torch.get_num_threads(), cores) // jobs)


def device_for_job(device: str, hydra_cfg) -> str:
    """With a parallel launcher on a machine with several GPUs, job k gets GPU
    k mod (number of GPUs) unless the config names one (cuda:N or cpu)."""
    if device not in ("auto", "cuda") or parallel_jobs_of(hydra_cfg) == 1:
        return device
    import torch

    count = torch.cuda.device_count()
    return f"cuda:{hydra_cfg.job.num % count}" if count > 1 else device
