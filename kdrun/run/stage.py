"""The stage protocol: a stage of a run (the teacher, the scratch or distilled student of
one seed) is a value, a ``StageSpec``, and ``run_stage`` trains, reuses or resumes it
through the stage cache (kdrun/store/cache.py) and records its files in the run
directory. Schemes (kdrun/run/schemes/) say which specs a run has, through
kdrun/run/stages.py; the batched launcher plans from the same specs
(kdrun/sweep/batched.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig

from kdrun import distributed
from kdrun.data import Data, fingerprint
from kdrun.data.augment import make_augment
from kdrun.data.labels import UNLABELED
from kdrun.models import build_model, meta_model
from kdrun.models.quantize import fake_quantized
from kdrun.precision import working_dtype
from kdrun.report.logs import EventLog, MetricLogs
from kdrun.run.finish import finish_stage
from kdrun.run.int8_students import converted_int8, quantized
from kdrun.run.provenance import (
    arithmetic_order,
    numerics,
    numerics_columns,
    stage_material,
    student_seeds,
)
from kdrun.run.summary_row import RowContext, StageResult, SummaryRow
from kdrun.store.cache import StageEntry
from kdrun.store.files import RunDir, copy_file, load_sealed
from kdrun.train.features import feature_shape
from kdrun.train.fit import fit
from kdrun.train.shards import shard_changes_math
from kdrun.train.targets import TeacherTargets
from kdrun.train.tokens import row_shapes

log = logging.getLogger("kdrun")
# trainer.distill_from -> the checkpoint entry holding those weights
WEIGHTS = {"best_val": "best_model", "last": "model"}


@dataclasses.dataclass
class StageSpec:
    """One stage, as a value: what trains, on what, from what, and what its key holds
    beside the run's settings (``key``: its loss, its teacher, a transfer set, ...)."""

    role: str  # teacher | scratch | distilled | all_labels | generationN | ..._qat
    model_cfg: DictConfig
    make_loss: Callable  # builds its loss (after seeding: a learned part starts alike)
    seed: int  # names the stage in the run's files (the student seed)
    train_seed: int  # seeds its training: init, batch order, augmentation, dropout
    epochs: int
    data: Data  # what it trains on
    key: dict = dataclasses.field(default_factory=dict)
    teacher: TeacherTargets | None = None
    train: Callable | None = None  # fit's contract (kdrun/train/fit.py); fit when None
    # loads the weights it starts from into its built model (scheme=lifelong: the previous
    # task's), whose stage key is then in ``key``; None: it starts from its seeded init
    init: Callable[[torch.nn.Module], None] | None = None


@dataclasses.dataclass
class RunContext:
    """What every stage of one run shares: its config, data, device, run directory, the
    stage cache, the logs it writes to and the columns every row carries."""

    cfg: DictConfig
    data: Data
    device: torch.device
    run_dir: RunDir
    cache_root: Path
    numerics: dict
    data_digest: str
    row_context: RowContext
    metrics: MetricLogs
    events: EventLog
    augment: Callable | None  # in-memory data's augmentation (from disk: its DataLoader's)
    student_seeds: list[int]

    @property
    def tcfg(self):
        return self.cfg.trainer

    @property
    def dtype(self) -> torch.dtype:
        return working_dtype(self.cfg.trainer)  # float64 with trainer.float64

    @classmethod
    def open(cls, cfg: DictConfig, data: Data, device: torch.device, run_dir: RunDir,
             row_context: Callable[[dict, str], RowContext], metrics) -> RunContext:
        """``row_context(provenance, data digest)`` and ``metrics(row context)`` make the
        parts that depend on the run's scheme and logger."""
        run_dir.checkpoints.mkdir(parents=True, exist_ok=True)
        cache_root = cfg.cache.dir if cfg.cache.enabled else run_dir.root / "stages"
        if distributed.world().parallel:  # rank 0's: the others read it, never write to it
            cache_root = distributed.from_writer(Path(cache_root).resolve())
        found = numerics(cfg.trainer, device)
        digest = fingerprint(data)
        context = row_context({**numerics_columns(found), "data_sha256": digest,
                               **arithmetic_order(cfg.trainer, device)}, digest)
        augment = (make_augment(cfg.dataset.get("augment"), data.input_shape)
                   if data.train.in_memory else None)
        return cls(cfg, data, device, run_dir, Path(cache_root), found, digest, context,
                   metrics(context), EventLog(run_dir.events), augment, student_seeds(cfg))

    def entry(self, spec: StageSpec) -> StageEntry:
        """The cache entry of a stage trained as ``spec`` says."""
        key = {**spec.key, **processes_key(spec, self.data)}
        return StageEntry(self.cache_root, stage_material(
            self.cfg, role=spec.role, model_cfg=spec.model_cfg, seed=spec.train_seed,
            epochs=spec.epochs, numerics=self.numerics, data_digest=self.data_digest,
            adds=key))

    def load(self, model_cfg, entry: StageEntry, weights: str,
             data: Data | None = None) -> torch.nn.Module:
        """A finished stage's model with its ``weights`` (best_val | last), built for
        ``data`` (the run's unless a stage trained on other)."""
        data = data or self.data
        model = build_model(model_cfg, data.input_shape, data.num_classes, graph=data.graph)
        model.to(self.device, self.dtype)  # first: float64 weights are never rounded to float32
        model.load_state_dict(entry.result()[WEIGHTS[weights]])
        return model


def run_stage(spec: StageSpec, ctx: RunContext) -> StageResult:
    """Train ``spec``'s stage, or reuse it finished, or resume it killed, under its cache
    entry's lock; every process reads what rank 0 wrote; the checkpoint is copied into
    the run directory and the summary row returned."""
    entry = ctx.entry(spec)
    checkpoint = ctx.run_dir.checkpoint(spec.role, spec.seed, ctx.student_seeds[0])
    writer = distributed.world().writer
    with entry.lock() if writer else contextlib.nullcontext():
        # a finished entry that fails its checksums is set aside (by rank 0)
        reused = distributed.from_writer(entry.done() if writer else None)
        if reused:
            ctx.metrics.append(entry.read_rows(), spec.seed, reused=True)
            ctx.events.write("reused", spec.role, spec.seed, entry.key)
        else:
            train_stage(spec, entry, ctx)
        distributed.barrier()  # rank 0 has written the stage: every process reads it
        if writer:
            copy_file(entry.result_pt, checkpoint, entry.digest("result.pt"))
        summary = entry.summary()
    row = SummaryRow.from_stage(summary, seed=spec.seed, reused=reused, cache_key=entry.key,
                                checkpoint=str(checkpoint), run=ctx.row_context.run)
    return StageResult(row, entry)


def train_stage(spec: StageSpec, entry: StageEntry, ctx: RunContext) -> None:
    """Train a stage (from its saved state, if a killed run left one) and finish it."""
    resume = resume_state(entry)
    if resume is not None:
        ctx.metrics.append(entry.read_rows(), spec.seed, reused=True)
        ctx.events.write("resumed", spec.role, spec.seed, entry.key, from_epoch=resume["epoch"])
    every, writer = ctx.tcfg.checkpoint_every, distributed.world().writer

    def on_epoch(rows, snapshot):
        if writer:  # the others train alike, and write nothing
            entry.append_rows(rows)
        ctx.metrics.append(rows, spec.seed, reused=False)
        epoch = rows[0]["epoch"]
        if writer and every and epoch % every == 0 and epoch < spec.epochs:
            entry.save_state(snapshot())

    model, loss = build_stage(spec, ctx)
    train = spec.train or fit  # fit is looked up now: tests spy on it
    result = train(model, spec.data, loss, ctx.tcfg, stage=spec.role, epochs=spec.epochs,
                   seed=spec.train_seed, device=ctx.device, teacher=spec.teacher,
                   augment=ctx.augment, resume=resume, on_epoch=on_epoch, progress=ctx.cfg.progress,
                   label=f"{spec.role} seed {spec.seed}")
    figures = None
    if quantized(spec.model_cfg):  # the int8 model it converts to
        result, figures = converted_int8(model, result, ctx.data, ctx.tcfg)
    if writer:
        finish_stage(entry, model, loss, result, role=spec.role, seed=spec.seed,
                     train_seed=spec.train_seed, model_cfg=spec.model_cfg, data=spec.data,
                     cfg=ctx.cfg, context=ctx.row_context, trained_in="alone", figures=figures)
    ctx.events.write("trained", spec.role, spec.seed, entry.key)


def build_stage(spec: StageSpec, ctx: RunContext) -> tuple[torch.nn.Module, object]:
    """The stage's model and loss, built after seeding with its ``train_seed``: the model (fake
    quantised for quantisation-aware training), its loss attached and, for a feature
    loss, told the shapes of one row's features, student's and teacher's."""
    torch.manual_seed(spec.train_seed)
    data = spec.data  # a teacher with its own tokenizer: its own vocabulary and windows
    model = build_model(spec.model_cfg, data.input_shape, data.num_classes, spec.role,
                        data.graph)
    if spec.init is not None:
        spec.init(model)
    if quantized(spec.model_cfg):  # fake-quantised weights and activations
        model = fake_quantized(model, data.input_shape)
    loss = spec.make_loss()  # after seeding: a learned regressor starts alike per seed
    loss.attach(model)  # e.g. a mutual loss reads the whole cohort's outputs
    if loss.reads_features:  # the shapes of a row's features (kdrun/train/tokens.py)
        student = feature_shape(model, loss.student_layer, data.input_shape,
                                "loss.student_layer")
        loss.prepare(row_shapes(student, data.per_position),
                     row_shapes(spec.teacher.feature_shape(data.input_shape),
                                data.per_position))
    return model, loss


def processes_key(spec: StageSpec, data: Data) -> dict:
    """With several processes, ``{"processes": N}`` for a stage whose maths the shards
    change (kdrun/train/shards.py), else nothing: the shards of a plain stage give the
    single process's result up to rounding, and share its cache entry."""
    world = distributed.world()
    if not world.parallel:
        return {}
    with torch.random.fork_rng(devices=[]):  # a probe: the stage's draws stay its own
        loss = spec.make_loss()
    model = meta_model(spec.model_cfg, data.input_shape, data.num_classes)
    labelled = not (bool((spec.data.train.y == UNLABELED).any())
                    or getattr(spec.teacher, "rewrites", False))  # as fit() decides
    reason = shard_changes_math(model, loss, labelled)
    if reason is None:
        return {}
    log.info("%d processes: the stage key holds their number, since %s", world.size, reason)
    return {"processes": world.size}


def resume_state(entry: StageEntry) -> dict | None:
    """The state a stage resumes from (None: from the start), prepared by rank 0 and
    read by every process."""
    epoch = distributed.from_writer((entry.start() or {}).get("epoch") if
                                    distributed.world().writer else None)
    if epoch is None:
        return None
    state = load_sealed(entry.state_pt)
    if state is None or state["epoch"] != epoch:
        raise RuntimeError(f"{entry.state_pt} changed while the processes read it")
    return state
