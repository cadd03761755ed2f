"""The stage protocol: each stage of a run (the teacher, the scratch or distilled student
of one seed) is trained, reused or resumed through the stage cache (kdrun/store/cache.py),
and its files are recorded in the run directory. Schemes (kdrun/run/schemes/base.py) decide
which stages a run has; this module only runs them."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from kdrun import distributed
from kdrun.data import Data, Split, fingerprint, transfer_fingerprint
from kdrun.data.augment import make_augment
from kdrun.data.labels import UNLABELED
from kdrun.losses import CE
from kdrun.models import build_model, count_params, describe, meta_model
from kdrun.models.quantize import fake_quantized, post_training_int8, to_int8
from kdrun.precision import working_dtype
from kdrun.report.measure import model_figures, size_on_disk_mb
from kdrun.report.table import EventLog, MetricLogs, metric_logs
from kdrun.run.given_teacher import WEIGHTS, evaluate_given_teacher
from kdrun.run.provenance import (
    arithmetic_order,
    config_hash,
    loss_key,
    numerics,
    numerics_columns,
    run_keys,
    seed_stream,
    stage_material,
    student_seeds,
)
from kdrun.run.schemes import scheme_of
from kdrun.run.summary_row import RowContext, StageResult, SummaryRow
from kdrun.store.cache import StageEntry
from kdrun.store.files import RunDir, copy_file, load_sealed, save_sealed
from kdrun.train.data_free import fit_data_free
from kdrun.train.features import each_feature, feature_shape, predict_features
from kdrun.train.fit import (
    CachedLogits,
    LiveTeacher,
    TeacherTargets,
    TopKLogits,
    configure_device,
    evaluate,
    fit,
    on_shards,
    predict_logits,
    predict_topk,
)
from kdrun.train.shards import shard_changes_math
from kdrun.train.tokens import row_shapes

log = logging.getLogger("kdrun")
SCRATCH_ROLES = ("scratch", "scratch_qat")  # students trained without a teacher


class Stages:
    """Trains (or reuses, or resumes) each stage of one run and records its files."""

    def __init__(self, cfg: DictConfig, data: Data, device: torch.device, run_dir: RunDir,
                 teacher_topk: int | None = None):
        self.cfg, self.data, self.device, self.run_dir = cfg, data, device, run_dir
        self.tcfg = cfg.trainer
        # k of the top-k teacher cache: trainer.teacher_topk, or the memory plan's choice
        self.topk = teacher_topk or self.tcfg.get("teacher_topk")
        self.dtype = working_dtype(self.tcfg)  # float64 with trainer.float64
        run_dir.checkpoints.mkdir(parents=True, exist_ok=True)
        self.cache_root = cfg.cache.dir if cfg.cache.enabled else run_dir.root / "stages"
        if distributed.world().parallel:  # rank 0's: the others read it, never write to it
            self.cache_root = distributed.from_writer(Path(self.cache_root).resolve())
        self.events = EventLog(run_dir.events)
        # data read from disk is augmented by its DataLoader instead
        self.augment = (make_augment(cfg.dataset.get("augment"), data.input_shape)
                        if data.train.in_memory else None)
        self.numerics = numerics(self.tcfg, device)
        self.data_digest = fingerprint(data)
        self.use_data(data)
        self.student_seeds = student_seeds(cfg)
        self.row_context = RowContext(
            seed=cfg.seed, eval_split=data.eval_split,
            selected_by="val" if len(data.val) else "last epoch (no validation split)",
            provenance={**numerics_columns(self.numerics), "data_sha256": self.data_digest,
                        **arithmetic_order(self.tcfg, device)},
            run=run_keys(cfg, scheme_of(cfg).distillation_loss(cfg), data.metric))
        self.metrics = self.open_metric_logs()
        self.teacher_model = None  # the teacher the students are compared with (timing)

    def open_metric_logs(self) -> MetricLogs:
        """metrics.csv, and the configured logger's records (TensorBoard, MLflow)."""
        return metric_logs(self.cfg, self.run_dir.root, self.run_dir.metrics_csv,
                           self.row_context.run, config_hash(self.cfg))

    def teacher(self, model_cfg, all_labels: bool = False) -> StageResult:
        """Train (or reuse) a teacher of architecture ``model_cfg``, or load the user's;
        with ``all_labels``, trained on the transfer set's true labels too, where they
        exist (the data owner's teacher, when the students have a label budget)."""
        if model_cfg.get("checkpoint"):
            result = evaluate_given_teacher(self, model_cfg)
        else:
            data, extra = self.teacher_data(all_labels)
            result = self._stage("teacher", model_cfg, CE, self.cfg.seed, self.teacher_epochs,
                                 extra, rng=self.teacher_rng, data=data)
            model = self._load(model_cfg, result.entry, self.tcfg.distill_from)
            result = StageResult(result.row, result.entry, model)
        self.teacher_model = result.model
        return result

    @property
    def teacher_epochs(self) -> int:
        return self.tcfg.teacher_epochs or self.tcfg.epochs

    @property
    def student_epochs(self) -> int:
        """The epochs of every student stage (scratch and distilled alike)."""
        return self.tcfg.student_epochs or self.tcfg.epochs

    def teacher_data(self, all_labels: bool) -> tuple[Data, dict]:
        """What a teacher trains on, and what its key adds: the labelled examples, or with
        ``all_labels`` the transfer set's true labels too where they exist."""
        return (self.all_labels_data() if all_labels else None) or (self.data, {})

    @property
    def teacher_rng(self) -> int:
        """The teacher's own seed stream: it never shares init or batch order with a student."""
        return seed_stream("teacher", self.cfg.seed)

    def student(self, role: str, make_loss, seed: int, teacher: TeacherTargets | None = None,
                teacher_key: str | None = None, model_cfg=None, loss_cfg=None,
                rng: int | None = None) -> StageResult:
        """Scratch and distilled students of one seed share init, data order and
        optimiser: the model is built after seeding with ``seed`` in both cases
        (``rng``, when given, seeds a student that must not share them, e.g. an
        intermediate born-again generation)."""
        epochs = self.student_epochs
        extra = {}
        model_cfg = model_cfg if model_cfg is not None else self.float_student
        if loss_cfg is None:
            loss_cfg = OmegaConf.to_container(self.cfg.loss, resolve=True)
        data = self.data
        if role not in SCRATCH_ROLES:  # a distilled student depends on its loss and its teacher
            taught = teacher is not None
            extra = {"loss": loss_key(loss_cfg), "teacher": teacher_key if taught else None,
                     "distill_from": self.tcfg.distill_from if taught else None,
                     "teacher_targets": type(teacher).__name__ if taught else None}
            if taught:  # what top-k or on-policy targets add (only they: other keys unchanged)
                extra.update(getattr(teacher, "stage_key", {}))
            if taught and self.transfer_digest:  # and on the transfer set it also learns from
                extra["transfer"], data = self.transfer_digest, self.taught_data
        return self._stage(role, model_cfg, make_loss, seed, epochs, extra, teacher,
                           rng=seed if rng is None else rng, data=data)

    def all_labels_student(self, seed: int) -> StageResult | None:
        """The reference "scratch, all labels": the student trained from scratch on the
        labelled examples *and* the transfer set with its true labels, which no other
        stage reads; None when the transfer set's labels are unknown."""
        found = self.all_labels_data()
        if found is None:
            return None
        data, extra = found
        return self._stage("all_labels", self.float_student, CE, seed, self.student_epochs,
                           extra, rng=seed, data=data)

    def all_labels_data(self) -> tuple[Data, dict] | None:
        """The labelled examples and the transfer set with its true labels, as a stage's
        training data, with what its key adds; None when those labels are unknown."""
        train = self.data.all_labels_train()
        if train is None:
            return None
        labels = hashlib.sha256(self.data.transfer_labels.numpy().tobytes()).hexdigest()[:20]
        return self.data.training_on(train), {"transfer": self.transfer_digest,
                                              "transfer_labels": labels}

    def data_free_student(self, seed: int, teacher: StageResult, make_game,
                          settings: dict) -> StageResult:
        """The student distilled without data (scheme=data_free): trained by
        fit_data_free on a generator's inputs, which ``make_game()`` builds with its loss,
        from ``teacher.model``. It reads no training or validation example: only the test
        split, to be evaluated. ``settings`` (the scheme's keys) are part of its key."""
        def none_of(split: Split) -> Split:
            return Split(split.x[:0], split.y[:0])

        data = dataclasses.replace(self.data.training_on(none_of(self.data.train)),
                                   val=none_of(self.data.val))
        extra = {"loss": loss_key(settings), "teacher": teacher.entry.key,
                 "distill_from": self.tcfg.distill_from, "teacher_targets": "generated"}
        return self._stage("distilled", self.float_student, make_game, seed, self.student_epochs,
                           extra, teacher, rng=seed, data=data, fit_with=fit_data_free)

    @property
    def float_student(self):
        """The student's config as a float32 model (``student.quantize`` unset): what every
        stage trains unless it asks for the quantisation-aware one (``cfg.student``)."""
        student = self.cfg.student.copy()
        if student.get("quantize") is not None:
            student.quantize = None
        return student

    @property
    def int8(self) -> bool:
        """Whether the run also makes int8 students (``student.quantize=int8``)."""
        return self.cfg.student.get("quantize") == "int8"

    def post_training_int8(self, result: StageResult, seed: int) -> SummaryRow:
        """The row of a trained float32 student quantised to int8 after training (PTQ),
        its activation ranges calibrated on the labelled training examples: its last and
        its selected weights, each quantised and evaluated as int8."""
        calibration = [x for _, x, _ in self.data.train.to("cpu", torch.float32).batches(
            self.tcfg.eval_batch_size)]
        selected, last = (post_training_int8(self._load(self.float_student, result.entry,
                                                        which).cpu(),
                                             self.data.input_shape, calibration)
                          for which in ("best_val", "last"))
        return dataclasses.replace(result.row, role=f"{result.row.role}_ptq", cache_key=None,
                                   checkpoint=None, **self.int8_columns(selected, last))

    def int8_columns(self, selected, last) -> dict:
        """A student's row columns as int8: the validation and test metric of its selected
        weights' int8 model, the test metric of its last weights', and the size on disk."""
        def metric(model, split) -> float:  # on the CPU, in float32
            return (evaluate(model, split.to("cpu", torch.float32), self.tcfg.eval_batch_size,
                             self.data.metric)[1] if len(split) else float("nan"))

        return {"val_acc_best": metric(selected, self.data.val),
                "test_acc_best_val": metric(selected, self.data.test),
                "test_acc_last": metric(last, self.data.test),
                "size_mb": round(size_on_disk_mb(selected), 4)}

    def load_student(self, result: StageResult) -> torch.nn.Module:
        """A finished student, with the weights ``trainer.distill_from`` asks for."""
        return self._load(self.cfg.student, result.entry, self.tcfg.distill_from)

    def add_transfer(self, extra: Split) -> None:
        """More unlabelled examples for the distilled students (e.g. text the teacher
        wrote: scheme=sequence_kd), after the transfer set there is; their content is
        part of the distilled stages' keys, as the transfer set's is."""
        transfer = extra if self.data.transfer is None else self.data.transfer.joined(extra)
        self.use_data(dataclasses.replace(self.data, transfer=transfer, transfer_labels=None,
                                          transfer_digest=None))

    def use_data(self, data: Data) -> None:
        """The run's data, and what a student taught by a teacher trains on: the transfer
        set too, if there is one, whose hash is part of its key."""
        self.data = data
        self.transfer_digest = transfer_fingerprint(data)
        self.taught_data = data if data.transfer is None else data.training_on(
            data.distill_train())

    def teacher_targets(self, teacher: StageResult, loss) -> TeacherTargets:
        """When the training data is not augmented (the default): the teacher's logits,
        computed once, and for a loss that reads them its features at the loss's layer,
        computed once too when they fit ``trainer.cache_teacher_features_mb``. Else the
        teacher itself, run on each batch."""
        features = loss.reads_features
        cacheable = (self.data.train.in_memory and self.augment is None
                     and self.tcfg.cache_teacher_logits)
        topk = self.topk
        if cacheable and not features and topk and topk < self.data.num_classes:
            return TopKLogits(*self.teacher_topk(teacher, topk), self.data.num_classes)
        if cacheable and not features:
            return CachedLogits(self.teacher_logits(teacher))
        if cacheable and self.features_fit(teacher.model, loss.teacher_layer):
            return CachedLogits(self.teacher_logits(teacher),
                                self.teacher_features(teacher, loss.teacher_layer))
        return LiveTeacher(teacher.model, configure_device(self.tcfg, self.device),
                           loss.teacher_layer if features else None)

    def teacher_logits(self, teacher: StageResult) -> torch.Tensor:
        """The teacher's logits on every example a taught student trains on."""
        return training_logits(teacher.model, teacher.entry, self.taught_data, self.tcfg,
                               self.device, self.transfer_digest)

    def teacher_topk(self, teacher: StageResult, k: int) -> list[torch.Tensor]:
        """The teacher's top-k logits (TopKLogits) on every example a taught student
        trains on, stored with the teacher as its full logits are."""
        return _on_training_set(
            "top-k logits", teacher.entry, f"logits-top{k}-{self.tcfg.distill_from}",
            teacher.model, self.taught_data, self.tcfg, self.device, self.transfer_digest,
            lambda split: predict_topk(teacher.model, split, k, self.tcfg.eval_batch_size))

    def teacher_features(self, teacher: StageResult, layer):
        """The teacher's features at ``layer`` on every example a taught student trains on."""
        return training_features(teacher.model, teacher.entry, self.taught_data, self.tcfg,
                                 self.device, layer, self.transfer_digest)

    def features_fit(self, teacher: torch.nn.Module, layer) -> bool:
        """Whether the teacher's features at ``layer`` over the training set take at most
        ``trainer.cache_teacher_features_mb``."""
        shapes = feature_shape(teacher, layer, self.data.input_shape, "loss.teacher_layer")
        shapes = [shapes] if isinstance(layer, str) else shapes
        size = sum(math.prod(shape) for shape in shapes) * len(self.taught_data.train)
        megabytes = size * torch.finfo(self.dtype).bits / 8 / 1e6
        return megabytes <= self.tcfg.get("cache_teacher_features_mb", 0)

    # ------------------------------------------------------------ one stage

    def _stage(self, role, model_cfg, make_loss, seed, epochs, extra, teacher=None, *,
               rng, data: Data | None = None, fit_with=None) -> StageResult:
        """``seed`` names the stage in the files; ``rng`` seeds its training; ``data`` is
        what it trains on (the run's labelled data unless given); ``fit_with`` trains it
        (fit's contract, kdrun/train/fit.py; fit itself unless given)."""
        data = data or self.data
        extra = {**extra, **self.processes_key(model_cfg, make_loss, data, teacher)}
        entry = self.stage_entry(role, model_cfg, rng, epochs, extra)
        checkpoint = self.run_dir.checkpoint(role, seed, self.student_seeds[0])
        with entry.lock() if distributed.world().writer else contextlib.nullcontext():
            # a finished entry that fails its checksums is set aside (by rank 0)
            reused = distributed.from_writer(entry.done() if distributed.world().writer else None)
            if reused:
                self.metrics.append(entry.read_rows(), seed, reused=True)
                self.events.write("reused", role, seed, entry.key)
            else:
                self._train(entry, role, model_cfg, make_loss, seed, epochs, teacher, rng, data,
                            fit_with)
            distributed.barrier()  # rank 0 has written the stage: every process reads it
            if distributed.world().writer:
                copy_file(entry.result_pt, checkpoint, entry.digest("result.pt"))
            summary = entry.summary()
        row = SummaryRow.from_stage(summary, seed=seed, reused=reused, cache_key=entry.key,
                                    checkpoint=str(checkpoint), run=self.row_context.run)
        return StageResult(row, entry)

    def processes_key(self, model_cfg, make_loss, data: Data, teacher) -> dict:
        """With several processes, ``{"processes": N}`` for a stage whose maths the shards
        change (kdrun/train/shards.py), else nothing: the shards of a plain stage give the
        single process's result up to rounding, and share its cache entry."""
        world = distributed.world()
        if not world.parallel:
            return {}
        with torch.random.fork_rng(devices=[]):  # a probe: the stage's draws stay its own
            loss = make_loss()
        model = meta_model(model_cfg, data.input_shape, data.num_classes)
        labelled = not (bool((data.train.y == UNLABELED).any())
                        or getattr(teacher, "rewrites", False))  # as fit() decides
        reason = shard_changes_math(model, loss, labelled)
        if reason is None:
            return {}
        log.info("%d processes: the stage key holds their number, since %s", world.size, reason)
        return {"processes": world.size}

    def stage_entry(self, role: str, model_cfg, rng: int, epochs: int, extra: dict) -> StageEntry:
        """The cache entry of a stage trained with these settings."""
        return StageEntry(self.cache_root, stage_material(
            self.cfg, role=role, model_cfg=model_cfg, seed=rng, epochs=epochs,
            numerics=self.numerics, data_digest=self.data_digest, extra=extra))

    def _train(self, entry: StageEntry, role, model_cfg, make_loss, seed, epochs, teacher, rng,
               data: Data, fit_with=None):
        resume = self._resume_state(entry)
        if resume is not None:
            self.metrics.append(entry.read_rows(), seed, reused=True)
            self.events.write("resumed", role, seed, entry.key, from_epoch=resume["epoch"])
        every, writer = self.tcfg.checkpoint_every, distributed.world().writer

        def on_epoch(rows, snapshot):
            if writer:  # the others train alike, and write nothing
                entry.append_rows(rows)
            self.metrics.append(rows, seed, reused=False)
            if writer and every and rows[0]["epoch"] % every == 0 and rows[0]["epoch"] < epochs:
                entry.save_state(snapshot())

        torch.manual_seed(rng)
        model = build_model(model_cfg, self.data.input_shape, self.data.num_classes, role)
        quantized = model_cfg.get("quantize") == "int8"
        if quantized:  # trained with fake-quantised weights and activations (QAT)
            model = fake_quantized(model, self.data.input_shape)
        loss = make_loss()  # built after seeding: a learned regressor starts alike per seed
        loss.attach(model)  # e.g. a mutual loss reads the whole cohort's outputs
        if loss.reads_features:  # the shapes of a row's features (kdrun/train/tokens.py)
            per_position = self.data.per_position
            loss.prepare(row_shapes(feature_shape(model, loss.student_layer,
                                                  self.data.input_shape, "loss.student_layer"),
                                    per_position),
                         row_shapes(teacher.feature_shape(self.data.input_shape), per_position))
        train = fit_with or fit  # fit is looked up now: tests spy on it
        result = train(model, data, loss, self.tcfg, stage=role, epochs=epochs, seed=rng,
                       device=self.device, teacher=teacher, augment=self.augment, resume=resume,
                       on_epoch=on_epoch, progress=self.cfg.progress, label=f"{role} seed {seed}")
        figures = None
        if quantized:  # the accuracies and size of the int8 model it converts to
            result, figures = self.converted_int8(model, result)
        if writer:
            finish_stage(entry, model, loss, result, role=role, seed=seed, rng=rng,
                         model_cfg=model_cfg, data=data, cfg=self.cfg,
                         context=self.row_context, trained_in="alone", figures=figures)
        self.events.write("trained", role, seed, entry.key)

    def converted_int8(self, fake, result) -> tuple:
        """A quantisation-aware stage's result as int8: its last and its selected weights
        converted to int8 and evaluated so; and the int8 model's size."""
        selected = copy.deepcopy(fake)
        selected.load_state_dict(result.best_state)
        columns = self.int8_columns(to_int8(selected), to_int8(fake))
        size_mb = columns.pop("size_mb")
        return dataclasses.replace(result, **columns), {"params": count_params(fake),
                                                        "size_mb": size_mb}

    @staticmethod
    def _resume_state(entry: StageEntry) -> dict | None:
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

    def _load(self, model_cfg, entry: StageEntry, weights: str) -> torch.nn.Module:
        checkpoint = entry.result()
        model = build_model(model_cfg, self.data.input_shape, self.data.num_classes)
        model.load_state_dict(checkpoint[WEIGHTS[weights]])
        return model.to(self.device, self.dtype)


def training_logits(teacher, entry: StageEntry, data: Data, tcfg, device,
                    transfer_digest: str | None = None) -> torch.Tensor:
    """The teacher's logits on every training example (``data.train``: with a transfer
    set, the labelled examples then the transfer set whose hash is ``transfer_digest``),
    computed once in eval mode without gradients, stored (sealed) with the teacher, and
    reused by every distillation epoch and every job that distills from this teacher."""
    return _on_training_set(
        "logits", entry, f"logits-{tcfg.distill_from}", teacher, data, tcfg, device,
        transfer_digest, lambda split: predict_logits(teacher, split, tcfg.eval_batch_size))


def training_features(teacher, entry: StageEntry, data: Data, tcfg, device, layer,
                      transfer_digest: str | None = None):
    """The teacher's features at ``layer`` (a list of layers: a list of tensors) on every
    training example, computed, stored and reused as its logits are."""
    name = "+".join([layer] if isinstance(layer, str) else list(layer))
    return _on_training_set(
        "features", entry, f"features-{name}-{tcfg.distill_from}", teacher, data, tcfg, device,
        transfer_digest,
        lambda split: predict_features(teacher, split, layer, tcfg.eval_batch_size,
                                       "loss.teacher_layer"))


def _on_training_set(what: str, entry: StageEntry, stem: str, teacher, data: Data, tcfg, device,
                     transfer_digest: str | None, compute):
    """``compute(training split)`` of the teacher, kept sealed in its cache entry as
    ``<stem>[-transfer-<hash>].pt``; a file that fails its checksum is computed again."""
    transfer = f"-transfer-{transfer_digest}" if transfer_digest else ""
    path = entry.dir / f"{stem}{transfer}.pt"
    writer = distributed.world().writer
    with entry.lock() if writer else contextlib.nullcontext():
        stored = load_sealed(path) if writer else None
        if distributed.from_writer(stored is not None):
            stored = stored if writer else load_sealed(path)
            return each_feature(lambda value: value.to(device), stored)
        if writer and (path.exists() or path.name in entry.derived()):
            log.warning("stage cache: %s is missing or does not match its checksum; "
                        "computing the teacher's %s again", path, what)
        dtype = working_dtype(tcfg)
        teacher.to(device, dtype)
        result = on_shards(compute, data.train.to(device, dtype))
        if writer:
            save_sealed(path, each_feature(lambda value: value.cpu(), result))
            entry.note_derived(path.name)
        return result



def finish_stage(entry: StageEntry, model, loss, result, *, role: str, seed: int, rng: int,
                 model_cfg, data: Data, cfg: DictConfig, context: RowContext,
                 trained_in: str, figures: dict | None = None) -> None:
    """Write a trained stage's checkpoint and summary into its cache entry.
    ``trained_in`` says how: alone, or in a batch of students trained as one; ``figures``
    (params, size_mb) replace the model's own (an int8 model's size)."""
    checkpoint = trained_checkpoint(model, loss, result, model_cfg, data, cfg)
    entry.finish(checkpoint={**checkpoint, "role": role, "seed": seed, "rng_seed": rng},
                 summary={"role": role, "arch": describe(model_cfg),
                          **(figures or model_figures(getattr(model, "deployed", model))),
                          **_result_columns(result), **examples_seen(data),
                          **token_speed(data, result),
                          "eval_split": context.eval_split,
                          "selected_by": "last epoch (data-free)" if result.generated
                          else context.selected_by,
                          **context.provenance, "trained_in": trained_in})


def examples_seen(data: Data) -> dict:
    """How many labelled and unlabelled training examples a stage trained on, and how
    many validation examples selected its epoch."""
    no_label = data.train.y == UNLABELED  # text: one per position, (examples, positions)
    no_label = no_label.unsqueeze(1) if no_label.ndim == 1 else no_label
    unlabeled = int(no_label.all(1).sum())
    return {"train_labeled": len(data.train) - unlabeled, "train_unlabeled": unlabeled,
            "val_examples": len(data.val) if data.eval_split != "train" else 0}


def token_speed(data: Data, result) -> dict:
    """A language model's stage: the positions it predicts per epoch (every one is a
    token trained on) and the tokens per second of its training epochs."""
    if not data.per_position:
        return {}
    tokens = data.train.y.numel()
    rate = tokens * result.epochs / result.train_seconds if result.train_seconds else None
    return {"train_tokens": tokens, "train_tokens_per_s": rate and round(rate)}


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
    generated = {} if result.generated is None else {"train_generated": result.generated}
    return {"epochs": result.epochs, "best_epoch": result.best_epoch,
            "val_acc_best": result.val_acc_best, "test_acc_last": result.test_acc_last,
            "test_acc_best_val": result.test_acc_best_val,
            "train_seconds": round(result.train_seconds, 3), **generated}


def feature_shapes(loss, student: torch.nn.Module, teacher: torch.nn.Module, input_shape,
                   per_position: bool = False):
    """The shapes of the layers a feature loss reads, student's and teacher's: of one
    row's when the targets are per position (a language model)."""
    return (row_shapes(feature_shape(student, loss.student_layer, input_shape,
                                     "loss.student_layer"), per_position),
            row_shapes(feature_shape(teacher, loss.teacher_layer, input_shape,
                                     "loss.teacher_layer"), per_position))
