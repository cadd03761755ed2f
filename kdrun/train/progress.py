"""A stage's progress as its epochs pass: a tqdm bar on a terminal; in a file (a log, a
pipe, a Slurm job's output) one plain line when the stage ends and one every
``LINE_EVERY_S`` seconds before that, never the carriage returns a bar writes."""

from __future__ import annotations

import logging
import sys
import time

from tqdm.auto import tqdm

from kdrun.data.metrics import ACCURACY, Metric

log = logging.getLogger("kdrun")
LINE_EVERY_S = 30.0  # in a file: at most one line per this many seconds while a stage trains
# Where this process is: the stage training now and its last finished epoch (what an
# interrupted run reports; kdrun/cli/main.py)
_WHERE = {"stage": None, "epoch": 0}


def where_now() -> str | None:
    """"teacher seed 0 at epoch 12" for the stage training now, or None between stages."""
    if _WHERE["stage"] is None:
        return None
    return f"{_WHERE['stage']}, after epoch {_WHERE['epoch']}"


def training(stage: str | None, epoch: int = 0) -> None:
    """Note that ``stage`` is training and has finished ``epoch`` (None: none is)."""
    _WHERE.update(stage=stage, epoch=epoch)


def on_terminal() -> bool:
    """Whether a progress bar would reach a person: stderr is a terminal."""
    return sys.stderr.isatty()


class StageProgress:
    """``update(epoch, loss, val)`` after each epoch, ``close()`` at the end."""

    def __init__(self, stage: str, epochs: int, done: int, enabled: bool,
                 metric: Metric = ACCURACY):
        self.stage, self.epochs, self.metric = stage, epochs, metric
        self.bar = None
        self.lines = enabled and not on_terminal()
        if enabled and not self.lines:
            self.bar = tqdm(total=epochs, initial=done, desc=f"{stage:<9}", unit="ep",
                            leave=True, dynamic_ncols=True)
        self.started = self.last_line = time.monotonic()
        self.state = ""
        training(stage, done)

    def update(self, epoch: int, loss: float, val_metric: float) -> None:
        training(self.stage, epoch)
        val = f"{val_metric:.1f}{self.metric.unit}" if self.metric.unit == "%" else \
            f"{self.metric.short} {val_metric:.2f}"
        self.state = f"epoch {epoch}/{self.epochs}, loss {loss:.3f}, val {val}"
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", val=val)
        elif self.lines and time.monotonic() - self.last_line >= LINE_EVERY_S \
                and epoch < self.epochs:
            self.last_line = time.monotonic()
            log.info("%s: %s", self.stage, self.state)

    def close(self) -> None:
        training(None)
        if self.bar is not None:
            self.bar.close()
        elif self.lines and self.state:
            log.info("%s: %s (%.1f s)", self.stage, self.state, time.monotonic() - self.started)
