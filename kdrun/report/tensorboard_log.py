"""``logger=tensorboard``: the metric rows of metrics.csv, also as TensorBoard scalars.

One event folder per seed (``<run>/tensorboard/seed<N>``), so TensorBoard shows each
seed as a run and overlays the stages: tags ``<stage>/<split>_score`` and
``<stage>/<split>_loss`` per epoch. The resolved config is stored as text.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kdrun.report.metric_log import MetricLog


class TensorBoardLog(MetricLog):
    def __init__(self, folder: Path, cfg: DictConfig):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        shutil.rmtree(folder, ignore_errors=True)  # a restarted run logs afresh, as metrics.csv
        self.folder, self.writer_class, self.writers = Path(folder), SummaryWriter, {}
        self.config_text = "```yaml\n" + OmegaConf.to_yaml(cfg, resolve=True) + "```"

    def append(self, rows: list[dict], seed: int, reused: bool = False) -> None:
        writer = self._writer(seed)
        for row in rows:
            tag = f"{row['stage']}/{row['split']}"
            writer.add_scalar(f"{tag}_score", row["score"], row["epoch"])
            writer.add_scalar(f"{tag}_loss", row["loss"], row["epoch"])
        writer.flush()

    def _writer(self, seed: int):
        if seed not in self.writers:
            self.writers[seed] = self.writer_class(str(self.folder / f"seed{seed}"))
            self.writers[seed].add_text("config", self.config_text)
        return self.writers[seed]

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
