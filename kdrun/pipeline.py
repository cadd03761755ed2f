"""The four stages: train the teacher, train the student from scratch, distill the
student from the teacher, compare. The pipeline never knows which loss it runs."""

from __future__ import annotations

import logging
import os
import statistics
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from kdrun.data import Data, load_data
from kdrun.errors import ConfigError
from kdrun.losses import CE, build_loss
from kdrun.models import build_model, count_params, describe, size_mb
from kdrun.report import MetricsLog, comparison_table, write_summary
from kdrun.store import RunDir, save_checkpoint
from kdrun.train import FitResult, fit, latency_ms, predict_logits

log = logging.getLogger("kdrun")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "CUDA is not available on this machine; use cpu or auto")
    return torch.device(name)


def run_keys(cfg: DictConfig) -> dict:
    """The settings that tell runs of a sweep apart, added to every CSV row."""
    return {"dataset": cfg.dataset.name, "method": cfg.loss.name,
            "T": cfg.loss.get("T"), "alpha": cfg.loss.get("alpha")}


def student_seeds(cfg: DictConfig) -> list[int]:
    return [cfg.seed + i for i in range(cfg.repeats)]


def run(cfg: DictConfig, out_dir: str | os.PathLike) -> dict:
    """Run the whole pipeline into ``out_dir``; return the summary rows and the table."""
    device = pick_device(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(min(cfg.num_threads, os.cpu_count() or 1))
    run_dir = RunDir(out_dir)
    run_dir.checkpoints.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg.dataset, cfg.split)
    log.info("data: %s, %d train / %d val / %d %s examples, input %s, %d classes",
             data.name, len(data.train), len(data.val), len(data.test), data.eval_split,
             data.input_shape, data.num_classes)
    stages = Stages(cfg, data, device, run_dir)

    teacher, rows = stages.teacher()
    loss = build_loss(cfg.loss)
    soft_targets = None
    if loss.needs_teacher:
        soft_targets = stages.teacher_logits(teacher)
    else:
        log.info("loss=%s uses no teacher: the distill stage repeats scratch training "
                 "(a control; its gain should be about zero)", cfg.loss.name)
    for seed in student_seeds(cfg):
        rows.append(stages.student("scratch", CE(), seed))
        rows.append(stages.student("distilled", loss, seed, soft_targets))

    summary = write_summary(run_dir.summary_csv, rows)
    table = comparison_table(summary, header=_header(cfg, data))
    log.info("\n%s\nfiles: %s (metrics.csv, summary.csv, checkpoints/)", table, run_dir.root)
    distilled_val = [r["val_acc_best"] for r in rows if r["role"] == "distilled"]
    return {"rows": rows, "table": table, "distilled_val_acc": statistics.mean(distilled_val)}


class Stages:
    """Trains the teacher and the students of one run and records their files."""

    def __init__(self, cfg: DictConfig, data: Data, device: torch.device, run_dir: RunDir):
        self.cfg, self.data, self.device, self.run_dir = cfg, data, device, run_dir
        self.tcfg = cfg.trainer
        self.metrics = MetricsLog(run_dir.metrics_csv, run_keys(cfg))

    def teacher(self) -> tuple[torch.nn.Module, list[dict]]:
        model, result = self._train("teacher", self.cfg.teacher, CE(), self.cfg.seed,
                                    self.tcfg.teacher_epochs or self.tcfg.epochs)
        if self.tcfg.distill_from == "best_val":
            model.load_state_dict(result.best_state)
        return model, [self._summary_row("teacher", self.cfg.teacher, model, result)]

    def teacher_logits(self, teacher: torch.nn.Module) -> torch.Tensor:
        """The teacher's logits on every training example, computed once in eval mode
        without gradients, and reused by every distillation epoch."""
        teacher.to(self.device)
        return predict_logits(teacher, self.data.train.x.to(self.device), self.tcfg.eval_batch_size)

    def student(self, role: str, loss, seed: int, soft_targets=None) -> dict:
        """Scratch and distilled students of one seed share init, data order and
        optimiser: the model is built after seeding with ``seed`` in both cases."""
        epochs = self.tcfg.student_epochs or self.tcfg.epochs
        model, result = self._train(role, self.cfg.student, loss, seed, epochs, soft_targets)
        return self._summary_row(role, self.cfg.student, model, result)

    def _train(self, role, model_cfg, loss, seed, epochs, soft_targets=None):
        torch.manual_seed(seed)
        model = build_model(model_cfg, self.data.input_shape, self.data.num_classes, role)
        result = fit(
            model, self.data, loss, self.tcfg, stage=role, epochs=epochs, seed=seed,
            device=self.device, soft_targets=soft_targets, progress=self.cfg.progress,
            on_epoch=lambda rows: self.metrics.append(rows, seed),
        )
        self._save(role, model_cfg, model, result)
        return model, result

    def _save(self, role, model_cfg, model, result: FitResult) -> Path:
        path = self.run_dir.checkpoint(role, result.seed, self.cfg.seed)
        save_checkpoint(path, {
            "role": role, "arch": OmegaConf.to_container(model_cfg, resolve=True),
            "input_shape": list(self.data.input_shape), "num_classes": self.data.num_classes,
            "model": model.state_dict(), "best_model": result.best_state,
            "epoch": result.epochs, "best_epoch": result.best_epoch,
            "optimizer": result.optimizer_state, "seed": result.seed,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        })
        return path

    def _summary_row(self, role, model_cfg, model, result: FitResult) -> dict:
        return {
            "role": role, "seed": result.seed, "arch": describe(model_cfg),
            "params": count_params(model), "size_mb": round(size_mb(model), 4),
            "epochs": result.epochs, "best_epoch": result.best_epoch,
            "val_acc_best": result.val_acc_best, "test_acc_last": result.test_acc_last,
            "test_acc_best_val": result.test_acc_best_val, "eval_split": self.data.eval_split,
            "train_seconds": round(result.train_seconds, 3),
            "latency_ms": round(latency_ms(model, self.data.input_shape, self.device), 4),
            "checkpoint": str(self.run_dir.checkpoint(role, result.seed, self.cfg.seed)),
            **run_keys(self.cfg),
        }


def _header(cfg: DictConfig, data: Data) -> str:
    loss = " ".join(f"{k}={v}" for k, v in cfg.loss.items() if k != "name")
    loss = f"loss={cfg.loss.name} {loss}".strip()
    seeds = ",".join(map(str, student_seeds(cfg)))
    text = f"kdrun | dataset={data.name} | {loss} | student seeds {seeds}"
    if data.eval_split == "train":
        text += ("\naccuracies are on the TRAINING data: the labels are random, so they "
                 "measure memorisation, not generalisation")
    return text
