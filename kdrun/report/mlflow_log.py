"""``logger=mlflow``: each run as an MLflow run, each sweep as a parent run with one
child run per job (``pip install 'kdrun[mlflow]'``).

A run logs its resolved config as params (flattened, dotted), every metrics.csv row as
``<stage>/seed<N>/<split>_score`` and ``_loss`` at step = epoch, the summary's means
(``<role>/test_metric_best_val`` ...) and the gain, and as artifacts summary.csv,
metrics.csv and the printed table. The sweep's parent run gets the sweep report and
its plots. The store is ``logger.tracking_uri``, by default a local file store,
``<output_root>/mlruns``: ``mlflow ui --backend-store-uri outputs/mlruns``.

A re-run continues its MLflow run instead of starting a duplicate: a run is found by
its ``kdrun.job`` tag (the config's hash, and the sweep's folder for a sweep job, the
folder a sweep is resumed in), and a metric already logged at an epoch is not logged
again.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kdrun.report.metric_log import MetricLog
from kdrun.report.statistics import paired_gain

log = logging.getLogger("kdrun")
JOB_TAG, SWEEP_TAG, PARENT_TAG = "kdrun.job", "kdrun.sweep_dir", "mlflow.parentRunId"
PARAMS_PER_CALL = 100  # MLflow's limit on params in one log_batch


def client_for(logger_cfg, output_root: str):
    """An MlflowClient on ``logger.tracking_uri``, or on the default file store."""
    from kdrun.errors import UserError

    try:
        from mlflow import MlflowClient
    except ImportError as e:
        raise UserError("logger=mlflow needs mlflow: pip install 'kdrun[mlflow]'") from e
    uri = logger_cfg.get("tracking_uri") or Path(output_root, "mlruns").resolve().as_uri()
    check_reachable(uri)
    if uri.startswith("file:"):  # MLflow 3 keeps its file store only for those who ask
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


CONNECT_TIMEOUT_S = 3.0  # a tracking server that does not answer this fast counts as down
PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"  # any MLflow server answers it


@functools.cache
def check_reachable(uri: str) -> None:
    """A tracking server (http, https) must answer MLflow's API within CONNECT_TIMEOUT_S,
    else one ConfigError line: MLflow's own client retries for minutes before it gives
    up. (An answer that needs credentials passes: MLflow reads them and says what is
    wrong.)"""
    import urllib.error
    import urllib.request

    from kdrun.errors import ConfigError

    if not uri.startswith(("http://", "https://")):
        return
    fix = "start the tracking server, correct the URI, or use logger=csv"
    try:
        urllib.request.urlopen(uri.rstrip("/") + PROBE, timeout=CONNECT_TIMEOUT_S).close()
    except urllib.error.HTTPError as e:
        if e.code not in (401, 403):
            raise ConfigError("logger.tracking_uri", uri, f"answers, but not as an MLflow "
                              f"tracking server (HTTP {e.code} on {PROBE}); {fix}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        reason = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
        raise ConfigError("logger.tracking_uri", uri, f"cannot be reached ({reason}, waited "
                          f"at most {CONNECT_TIMEOUT_S:g} s); {fix}") from e


def experiment_id(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # another job of the sweep created it first
        return client.get_experiment_by_name(name).experiment_id


def find_run(client, experiment: str, tag: str, value: str):
    """The run tagged ``tag=value``, or None."""
    runs = client.search_runs([experiment], filter_string=f"tags.`{tag}` = '{value}'",
                              max_results=1)
    return runs[0] if runs else None


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as dotted keys, values as text."""
    import pandas as pd

    row = pd.json_normalize(OmegaConf.to_container(cfg, resolve=True), sep=".").iloc[0]
    return {key: str(value) for key, value in row.items()}


def sweep_dir() -> Path | None:
    """The sweep's folder when this job is one of a multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir).resolve()


class MlflowLog(MetricLog):
    """One kdrun run's MLflow run: created, or found and continued."""

    def __init__(self, cfg: DictConfig, run_root: Path, config_hash: str):
        """``config_hash``: the run's settings (kdrun/run/provenance.py), which name its
        MLflow run: a re-run of the same settings continues it."""
        self.client = client_for(cfg.logger, cfg.output_root)
        self.experiment = experiment_id(self.client, cfg.logger.experiment)
        sweep = sweep_dir()
        parent = parent_run(self.client, self.experiment, sweep) if sweep else None
        # a sweep's job is its folder: two jobs may differ only in settings outside the
        # config hash (num_threads=1,2)
        job = config_hash + (f"@{Path(run_root).resolve()}" if sweep else "")
        found = find_run(self.client, self.experiment, JOB_TAG, job)
        if found is None:
            tags = {JOB_TAG: job, "kdrun.run_dir": str(Path(run_root).resolve())}
            if parent is not None:
                tags[PARENT_TAG] = parent
            self.run_id = self.client.create_run(self.experiment, tags=tags,
                                                 run_name=run_name(run_root, sweep)).info.run_id
            self._log_params(flat_params(cfg))
            self.logged: set[tuple[str, int]] = set()
        else:
            self.run_id = found.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            log.info("mlflow: continuing run %s", self.run_id)
            self.logged = self._logged_steps()

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=items[start:start + PARAMS_PER_CALL])

    def _logged_steps(self) -> set[tuple[str, int]]:
        """(metric, step) pairs this run already holds (a continued run)."""
        run = self.client.get_run(self.run_id)
        return {(key, m.step) for key in run.data.metrics
                for m in self.client.get_metric_history(self.run_id, key)}

    def append(self, rows: list[dict], seed: int, reused: bool = False) -> None:
        from mlflow.entities import Metric

        metrics = []
        for row in rows:
            for name in ("score", "loss"):
                key = f"{row['stage']}/seed{seed}/{row['split']}_{name}"
                if (key, int(row["epoch"])) not in self.logged and row[name] == row[name]:
                    metrics.append(Metric(key, float(row[name]), 0, int(row["epoch"])))
                    self.logged.add((key, int(row["epoch"])))
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        """Nothing to do: every append is already stored."""

    def finish(self, run_dir, summary, table: str) -> None:
        """The run's summary figures and files, and its status: finished."""
        from mlflow.entities import Metric

        metrics = [Metric(key, value, 0, 0) for key, value in summary_metrics(summary).items()
                   if (key, 0) not in self.logged]
        self.client.log_batch(self.run_id, metrics=metrics)
        for path in (run_dir.summary_csv, run_dir.metrics_csv):
            self.client.log_artifact(self.run_id, str(path))
        self.client.log_text(self.run_id, table, "table.txt")
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self) -> None:
        self.client.set_terminated(self.run_id, "FAILED")

    def interrupt(self) -> None:
        """Stopped by the user: KILLED, continued when the same command runs again."""
        self.client.set_terminated(self.run_id, "KILLED")


def run_name(run_root: Path, sweep: Path | None) -> str:
    """A sweep job by its overrides' folder name, a single run by its folder's time."""
    return Path(run_root).name if sweep is None else str(Path(run_root).relative_to(sweep))


def summary_metrics(summary) -> dict[str, float]:
    """Per role the mean accuracies over seeds, and the mean gain of distillation."""
    figures = {}
    for role, rows in summary.groupby("role"):
        for column in ("val_metric_best", "test_metric_last", "test_metric_best_val"):
            figures[f"{role}/{column}"] = float(rows[column].mean())
    if {"scratch", "distilled"} <= set(summary.role):
        figures["gain/test_metric_best_val"] = float(paired_gain(
            summary[summary.role == "scratch"], summary[summary.role == "distilled"],
            "test_metric_best_val").mean())
    return {k: v for k, v in figures.items() if v == v}  # NaN (no val split) left out


def parent_run(client, experiment: str, sweep: Path) -> str:
    """The sweep's parent run, created once by whichever job comes first (an OS lock in
    the sweep folder), found again when the sweep is resumed in its folder."""
    from filelock import FileLock

    sweep.mkdir(parents=True, exist_ok=True)
    with FileLock(str(sweep / ".mlflow.lock")):
        found = find_run(client, experiment, SWEEP_TAG, str(sweep))
        if found is None:
            found = client.create_run(experiment, tags={SWEEP_TAG: str(sweep)},
                                      run_name=f"sweep {sweep.parent.name}/{sweep.name}")
        return found.info.run_id


def log_sweep_report(cfg: DictConfig, sweep: Path, files: list[Path]) -> None:
    """The sweep report and its plots, as artifacts of the sweep's parent run."""
    client = client_for(cfg.logger, cfg.output_root)
    experiment = experiment_id(client, cfg.logger.experiment)
    run_id = parent_run(client, experiment, sweep.resolve())
    for path in files:
        if path.is_file():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")
