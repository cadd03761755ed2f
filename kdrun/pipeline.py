"""The stages of a run: train the teacher, train the student from scratch, distill the
student, compare. Who teaches whom is the scheme's (kdrun/schemes.py); the pipeline
never knows which loss it runs.

Each stage goes through the stage cache (kdrun/cache.py): a stage some earlier run
or sweep job finished is reused, a stage a killed run left half-done is resumed.
"""

from __future__ import annotations

import logging
import os
import statistics
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from kdrun.augment import make_augment
from kdrun.cache import StageEntry
from kdrun.data import Data, fingerprint, load_data
from kdrun.errors import ConfigError, UserError
from kdrun.export import export_distilled
from kdrun.features import feature_shape
from kdrun.given_teacher import load_given_teacher
from kdrun.losses import CE, build_loss, loss_class
from kdrun.measure import compare_with_teacher, model_figures
from kdrun.models import build_model, describe
from kdrun.provenance import (
    config_hash,
    given_teacher_material,
    numerics,
    numerics_columns,
    seed_stream,
    stage_material,
)
from kdrun.report import EventLog, comparison_table, metric_logs, write_summary
from kdrun.schemes import SCHEMES, distillation_loss
from kdrun.store import (
    RunDir,
    copy_file,
    load_sealed,
    remove_temporaries,
    save_sealed,
    sha256_file,
)
from kdrun.train import (
    CachedLogits,
    LiveTeacher,
    TeacherTargets,
    configure_device,
    evaluate,
    fit,
    predict_logits,
)

log = logging.getLogger("kdrun")

# trainer.distill_from -> the checkpoint entry holding those weights
WEIGHTS = {"best_val": "best_model", "last": "model"}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", name, "CUDA is not available on this machine; use cpu or auto")
    return torch.device(name)


def run_keys(cfg: DictConfig) -> dict:
    """The settings that tell runs of a sweep apart, added to every CSV row."""
    loss = distillation_loss(cfg)
    return {"dataset": cfg.dataset.name, "method": loss["name"],
            "T": loss.get("T"), "alpha": loss.get("alpha")}


def student_seeds(cfg: DictConfig) -> list[int]:
    """seed*repeats, ..., seed*repeats + repeats-1: a sweep over ``seed=0,1,2`` gets
    disjoint student seeds, so no two teachers share (and correlate) a scratch student."""
    return [cfg.seed * cfg.repeats + i for i in range(cfg.repeats)]


def run(cfg: DictConfig, out_dir: str | os.PathLike) -> dict:
    """Run the whole pipeline into ``out_dir``; return the summary rows and the table.
    A run directory that already holds this finished run is not run again."""
    run_dir = RunDir(out_dir)
    finished = _finished_run(cfg, run_dir)
    if finished is not None:
        return finished
    for folder in (run_dir.root, run_dir.checkpoints):
        remove_temporaries(folder)  # left by a run killed mid-write
    device = pick_device(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(min(cfg.num_threads, os.cpu_count() or 1))
    data = load_data(cfg.dataset, cfg.split)
    log.info("data: %s, %d train / %d val / %d %s examples, input %s, %d classes",
             data.name, len(data.train), len(data.val), len(data.test), data.eval_split,
             data.input_shape, data.num_classes)
    check_feature_layers(cfg, data)
    stages = Stages(cfg, data, device, run_dir)

    rows = SCHEMES.get(cfg.scheme.name, "scheme.name")(stages, cfg)
    stages.metrics.close()
    student = build_model(cfg.student, data.input_shape, data.num_classes)
    compare_with_teacher(rows, stages.teacher_model, student, data.input_shape, device,
                         cfg.latency)
    if cfg.export == "onnx":
        export_distilled(cfg, data, run_dir, student_seeds(cfg)[0])
    summary = write_summary(run_dir.summary_csv, rows)
    result = _report(cfg, data.name, data.eval_split, run_dir, summary)
    run_dir.mark_done({"config_hash": config_hash(cfg),
                       "distilled_val_acc": result["distilled_val_acc"]})
    return result


def _report(cfg, dataset_name, eval_split, run_dir: RunDir, summary: pd.DataFrame) -> dict:
    table = comparison_table(summary, header=_header(cfg, dataset_name, eval_split),
                             teacher=_teacher_scope(cfg))
    log.info("\n%s\nfiles: %s (metrics.csv, summary.csv, checkpoints/)", table, run_dir.root)
    distilled_val = summary[summary.role == "distilled"].val_acc_best
    return {"rows": summary.to_dict("records"), "table": table,
            "distilled_val_acc": float(statistics.mean(distilled_val))}


def _teacher_scope(cfg: DictConfig) -> str | None:
    """Which teacher the student seeds of a run share: what the verdict holds for."""
    if cfg.scheme.name == "dml":
        return None
    if cfg.scheme.name == "ensemble":
        return f"one ensemble of {len(cfg.scheme.teachers)} teachers (seed {cfg.seed})"
    if cfg.scheme.name == "offline" and cfg.teacher.get("checkpoint"):
        return f"one teacher ({cfg.teacher.checkpoint})"
    return f"one teacher (seed {cfg.seed})"


def _finished_run(cfg: DictConfig, run_dir: RunDir) -> dict | None:
    """The stored result when ``run_dir`` already holds this run, finished."""
    done = run_dir.done()
    if done is None:
        return None
    if done["config_hash"] != config_hash(cfg):
        raise UserError(f"{run_dir.root} already holds a finished run of another config; "
                        f"choose a new output directory")
    log.info("%s: this run already finished, nothing to do", run_dir.root)
    summary = pd.read_csv(run_dir.summary_csv)
    return _report(cfg, cfg.dataset.name, summary.eval_split.iloc[0], run_dir, summary)


class Stages:
    """Trains (or reuses, or resumes) each stage of one run and records its files."""

    def __init__(self, cfg: DictConfig, data: Data, device: torch.device, run_dir: RunDir):
        self.cfg, self.data, self.device, self.run_dir = cfg, data, device, run_dir
        self.tcfg = cfg.trainer
        run_dir.checkpoints.mkdir(parents=True, exist_ok=True)
        self.cache_root = cfg.cache.dir if cfg.cache.enabled else run_dir.root / "stages"
        self.metrics = metric_logs(cfg, run_dir.root, run_dir.metrics_csv, run_keys(cfg))
        self.events = EventLog(run_dir.events)
        self.augment = make_augment(cfg.dataset.get("augment"), data.input_shape)
        self.numerics = numerics(self.tcfg, device)
        self.data_digest = fingerprint(data)
        self.teacher_model = None  # the teacher the students are compared with (timing)

    @property
    def student_seeds(self) -> list[int]:
        return student_seeds(self.cfg)

    def teacher(self, model_cfg) -> tuple[torch.nn.Module, StageEntry, list[dict]]:
        """Train (or reuse) a teacher of architecture ``model_cfg``, or load the user's."""
        if model_cfg.get("checkpoint"):
            return self._given_teacher(model_cfg)
        epochs = self.tcfg.teacher_epochs or self.tcfg.epochs
        entry, row = self._stage("teacher", model_cfg, CE, self.cfg.seed, epochs, {},
                                 rng=seed_stream("teacher", self.cfg.seed))
        model = self._load(model_cfg, entry, self.tcfg.distill_from)
        self.teacher_model = model
        return model, entry, [row]

    def evaluated_teacher_row(self, arch: str, figures: dict, val_acc: float, test_acc: float,
                               *, train_seconds: float, reused: bool, **extra) -> dict:
        """The summary row of a teacher evaluated here but not trained in this stage (a
        user's checkpoint, an ensemble): the columns a trained stage's row has."""
        return {"role": "teacher", "seed": self.cfg.seed, "arch": arch, **figures,
                "epochs": 0, "best_epoch": 0, "val_acc_best": val_acc,
                "test_acc_last": test_acc, "test_acc_best_val": test_acc,
                "eval_split": self.data.eval_split, "selected_by": self._selected_by,
                "train_seconds": train_seconds, "reused": reused,
                **self.provenance_columns, **extra, **run_keys(self.cfg)}

    @property
    def provenance_columns(self) -> dict:
        """What every summary row records of the conditions behind its numbers."""
        return {**numerics_columns(self.numerics), "data_sha256": self.data_digest}

    @property
    def _selected_by(self) -> str:
        return "val" if len(self.data.val) else "last epoch (no validation split)"

    def load_student(self, entry: StageEntry) -> torch.nn.Module:
        """A finished student, with the weights ``trainer.distill_from`` asks for."""
        return self._load(self.cfg.student, entry, self.tcfg.distill_from)

    def _given_teacher(self, model_cfg):
        """A user's own trained teacher: loaded and evaluated instead of trained."""
        path = Path(model_cfg.checkpoint).expanduser()
        weights = WEIGHTS[self.tcfg.distill_from]
        model = load_given_teacher(model_cfg, self.data.input_shape, self.data.num_classes,
                                   weights).to(self.device)
        self.teacher_model = model
        entry = StageEntry(self.cache_root, given_teacher_material(
            self.cfg, model_cfg, sha256_file(path), weights, self.numerics, self.data_digest))
        with entry.lock():
            entry.record_given(str(path))  # so that files computed from it are tracked
        val_acc, test_acc = (evaluate(model, s.to(self.device), self.tcfg.eval_batch_size)[1]
                             if len(s) else float("nan") for s in (self.data.val, self.data.test))
        self.events.write("given", "teacher", self.cfg.seed, entry.key, checkpoint=str(path))
        row = self.evaluated_teacher_row(
            describe(model_cfg), model_figures(model),
            val_acc, test_acc, train_seconds=0.0, reused=True, cache_key=entry.key,
            checkpoint=str(path))
        return model, entry, [row]

    def teacher_targets(self, teacher: torch.nn.Module, entry: StageEntry,
                        loss: torch.nn.Module) -> TeacherTargets:
        """Cached logits when the training data is not augmented and the loss reads only
        logits (the default); else the teacher itself, run on each batch."""
        features = loss.reads_features
        cacheable = self.data.train.in_memory and self.augment is None
        if cacheable and self.tcfg.cache_teacher_logits and not features:
            return CachedLogits(self.teacher_logits(teacher, entry))
        return LiveTeacher(teacher, configure_device(self.tcfg, self.device),
                           loss.teacher_layer if features else None)

    def teacher_logits(self, teacher: torch.nn.Module, entry: StageEntry) -> torch.Tensor:
        return training_logits(teacher, entry, self.data, self.tcfg, self.device)

    def student(self, role: str, make_loss, seed: int, teacher=None, teacher_key=None,
                model_cfg=None, loss_cfg=None, rng: int | None = None):
        """Scratch and distilled students of one seed share init, data order and
        optimiser: the model is built after seeding with ``seed`` in both cases
        (``rng``, when given, seeds a student that must not share them, e.g. an
        intermediate born-again generation)."""
        epochs = self.tcfg.student_epochs or self.tcfg.epochs
        extra = {}
        model_cfg = model_cfg if model_cfg is not None else self.cfg.student
        if loss_cfg is None:
            loss_cfg = OmegaConf.to_container(self.cfg.loss, resolve=True)
        if role != "scratch":  # a distilled student depends on its loss and its teacher
            taught = teacher is not None
            extra = {"loss": loss_cfg, "teacher": teacher_key if taught else None,
                     "distill_from": self.tcfg.distill_from if taught else None,
                     "teacher_targets": type(teacher).__name__ if taught else None}
        return self._stage(role, model_cfg, make_loss, seed, epochs, extra, teacher,
                           rng=seed if rng is None else rng)

    # ------------------------------------------------------------ one stage

    def _stage(self, role, model_cfg, make_loss, seed, epochs, extra, teacher=None, *, rng):
        """``seed`` names the stage in the files; ``rng`` seeds its training."""
        entry = StageEntry(self.cache_root, stage_material(
            self.cfg, role=role, model_cfg=model_cfg, seed=rng, epochs=epochs,
            numerics=self.numerics, data_digest=self.data_digest, extra=extra))
        checkpoint = self.run_dir.checkpoint(role, seed, self.student_seeds[0])
        with entry.lock():
            reused = entry.done()  # a finished entry that fails its checksums is set aside
            if reused:
                self.metrics.append(entry.read_rows(), seed, reused=True)
                self.events.write("reused", role, seed, entry.key)
            else:
                self._train(entry, role, model_cfg, make_loss, seed, epochs, teacher, rng)
            copy_file(entry.result_pt, checkpoint, entry.digest("result.pt"))
            summary = entry.summary()
        row = {**summary, "seed": seed, "reused": reused, "cache_key": entry.key,
               "checkpoint": str(checkpoint), **run_keys(self.cfg)}
        return entry, row

    def _train(self, entry: StageEntry, role, model_cfg, make_loss, seed, epochs, teacher, rng):
        resume = entry.start()
        if resume is not None:
            self.metrics.append(entry.read_rows(), seed, reused=True)
            self.events.write("resumed", role, seed, entry.key, from_epoch=resume["epoch"])
        every = self.tcfg.checkpoint_every

        def on_epoch(rows, snapshot):
            entry.append_rows(rows)
            self.metrics.append(rows, seed, reused=False)
            if every and rows[0]["epoch"] % every == 0 and rows[0]["epoch"] < epochs:
                entry.save_state(snapshot())

        torch.manual_seed(rng)
        model = build_model(model_cfg, self.data.input_shape, self.data.num_classes, role)
        loss = make_loss()  # built after seeding: a learned regressor starts alike per seed
        loss.attach(model)  # e.g. a mutual loss reads the whole cohort's outputs
        if loss.reads_features:
            loss.prepare(*feature_shapes(loss, model, teacher.model, self.data.input_shape))
        result = fit(model, self.data, loss, self.tcfg, stage=role, epochs=epochs, seed=rng,
                     device=self.device, teacher=teacher, augment=self.augment, resume=resume,
                     on_epoch=on_epoch, progress=self.cfg.progress)
        checkpoint = trained_checkpoint(model, loss, result, model_cfg, self.data, self.cfg)
        entry.finish(checkpoint={**checkpoint, "role": role, "seed": seed, "rng_seed": rng},
                     summary={"role": role, "arch": describe(model_cfg),
                              **model_figures(getattr(model, "deployed", model)),
                              **_result_columns(result), "eval_split": self.data.eval_split,
                              "selected_by": self._selected_by, **self.provenance_columns})
        self.events.write("trained", role, seed, entry.key)

    def _load(self, model_cfg, entry: StageEntry, weights: str) -> torch.nn.Module:
        checkpoint = entry.result()
        model = build_model(model_cfg, self.data.input_shape, self.data.num_classes)
        model.load_state_dict(checkpoint[WEIGHTS[weights]])
        return model.to(self.device)


def training_logits(teacher, entry: StageEntry, data: Data, tcfg, device) -> torch.Tensor:
    """The teacher's logits on every training example, computed once in eval mode
    without gradients, stored (sealed) with the teacher, and reused by every
    distillation epoch and every job that distills from this teacher."""
    path = entry.dir / f"logits-{tcfg.distill_from}.pt"
    with entry.lock():
        logits = load_sealed(path)
        if logits is not None:
            return logits.to(device)
        if path.exists() or path.name in entry.derived():
            log.warning("stage cache: %s is missing or does not match its checksum; "
                        "computing the teacher's logits again", path)
        teacher.to(device)
        logits = predict_logits(teacher, data.train.to(device), tcfg.eval_batch_size)
        save_sealed(path, logits.cpu())
        entry.note_derived(path.name)
        return logits


def trained_checkpoint(model, loss, result, model_cfg, data: Data, cfg: DictConfig) -> dict:
    """A finished stage's checkpoint: last and best-val weights of the model and of the
    model it deploys (a cohort ships its first member), optimiser state, the config."""
    deployed = getattr(model, "deployed", model)
    prefix = next(name for name, m in model.named_modules() if m is deployed)
    best_deployed = {k.removeprefix(f"{prefix}.") if prefix else k: v
                     for k, v in result.best_state.items()
                     if not prefix or k.startswith(f"{prefix}.")}
    return {"arch": OmegaConf.to_container(model_cfg, resolve=True),
            "input_shape": list(data.input_shape), "num_classes": data.num_classes,
            "model": model.state_dict(), "best_model": result.best_state,
            "deployed": deployed.state_dict(), "deployed_best": best_deployed,
            "loss_state": loss.state_dict(), "epoch": result.epochs,
            "best_epoch": result.best_epoch, "optimizer": result.optimizer_state,
            "config": OmegaConf.to_container(cfg, resolve=True)}


def _result_columns(result) -> dict:
    return {"epochs": result.epochs, "best_epoch": result.best_epoch,
            "val_acc_best": result.val_acc_best, "test_acc_last": result.test_acc_last,
            "test_acc_best_val": result.test_acc_best_val,
            "train_seconds": round(result.train_seconds, 3)}


def feature_shapes(loss, student: torch.nn.Module, teacher: torch.nn.Module, input_shape):
    """The shapes of the layers a feature loss reads, student's and teacher's."""
    return (feature_shape(student, loss.student_layer, input_shape, "loss.student_layer"),
            feature_shape(teacher, loss.teacher_layer, input_shape, "loss.teacher_layer"))


def check_feature_layers(cfg: DictConfig, data: Data) -> None:
    """Before anything trains: a feature loss can read its layers from these models
    (e.g. attention transfer needs feature maps on both sides)."""
    if cfg.scheme.name not in ("offline", "born_again") or not loss_class(cfg.loss).reads_features:
        return
    teacher_cfg = cfg.student if cfg.scheme.name == "born_again" else cfg.teacher
    student, teacher = (build_model(c, data.input_shape, data.num_classes, role)
                        for c, role in ((cfg.student, "student"), (teacher_cfg, "teacher")))
    loss = build_loss(cfg.loss)
    loss.prepare(*feature_shapes(loss, student, teacher, data.input_shape))


def _header(cfg: DictConfig, dataset_name: str, eval_split: str) -> str:
    loss = " ".join(f"{k}={v}" for k, v in distillation_loss(cfg).items())
    seeds = ",".join(map(str, student_seeds(cfg)))
    text = f"kdrun | dataset={dataset_name} | loss: {loss} | student seeds {seeds}"
    if cfg.scheme.name != "offline":
        scheme = " ".join(f"{k}={v}" for k, v in cfg.scheme.items())
        text += f" | scheme: {scheme}"
    if eval_split == "train":
        text += ("\naccuracies are on the TRAINING data: the labels are random, so they "
                 "measure memorisation, not generalisation")
    return text
