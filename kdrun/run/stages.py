"""What a scheme (kdrun/run/schemes/) asks a run for: its teacher, its scratch and
distilled students of each seed, the targets a teacher gives them. Each is a StageSpec
run by ``runner`` (kdrun/run/stage.py: ``run_stage``; the batched launcher's planner in
kdrun/sweep/batched.py lists the specs instead)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from kdrun.data import Data, Split, transfer_fingerprint
from kdrun.losses import CE
from kdrun.report.logs import MetricLogs, metric_logs
from kdrun.run import int8_students
from kdrun.run.all_labels import all_labels_data, reference_spec
from kdrun.run.given_teacher import evaluate_given_teacher
from kdrun.run.provenance import config_hash, loss_key, run_keys, seed_stream
from kdrun.run.schemes import scheme_of
from kdrun.run.stage import RunContext, StageSpec, run_stage
from kdrun.run.summary_row import RowContext, StageResult, SummaryRow
from kdrun.train.data_free import fit_data_free
from kdrun.train.fit import configure_device
from kdrun.train.targets import TeacherOnData, TeacherTargets, choose_targets

SCRATCH_ROLES = ("scratch", "scratch_qat")  # students trained without a teacher


class Stages:
    """One run's stages as its scheme asks for them, each run by ``runner(spec, ctx)``."""

    def __init__(self, cfg: DictConfig, data: Data, device: torch.device, run_dir,
                 teacher_topk: int | None = None,
                 runner: Callable[[StageSpec, RunContext], StageResult] = run_stage,
                 metrics: Callable[[RowContext], MetricLogs] | None = None):
        self.cfg, self.tcfg, self.runner = cfg, cfg.trainer, runner
        # k of the top-k teacher cache: trainer.teacher_topk, or the memory plan's choice
        self.topk = teacher_topk or self.tcfg.get("teacher_topk")
        self.ctx = RunContext.open(
            cfg, data, device, run_dir,
            lambda provenance, digest: RowContext(
                seed=cfg.seed, eval_split=data.eval_split,
                selected_by="val" if len(data.val) else "last epoch (no validation split)",
                provenance=provenance,
                run=run_keys(cfg, scheme_of(cfg).distillation_loss(cfg), data.metric)),
            metrics or (lambda context: metric_logs(cfg, run_dir.root, run_dir.metrics_csv,
                                                    context.run, config_hash(cfg))))
        self.use_data(data)
        self.student_seeds = self.ctx.student_seeds
        self.int8 = int8_students.wanted(cfg)
        self.teacher_model = None  # the teacher the students are compared with (timing)

    # what schemes and the pipeline read of the run
    device = property(lambda self: self.ctx.device)
    dtype = property(lambda self: self.ctx.dtype)
    run_dir = property(lambda self: self.ctx.run_dir)
    metrics = property(lambda self: self.ctx.metrics)
    row_context = property(lambda self: self.ctx.row_context)
    augment = property(lambda self: self.ctx.augment)

    def teacher(self, model_cfg, all_labels: bool = False) -> StageResult:
        """Train (or reuse) a teacher of architecture ``model_cfg``, or load the user's;
        with ``all_labels``, trained on the transfer set's true labels too, where they
        exist (the data owner's teacher, when the students have a label budget)."""
        if model_cfg.get("checkpoint"):
            result = evaluate_given_teacher(self.ctx, model_cfg)
        else:
            spec = self.teacher_spec(model_cfg, all_labels)
            result = self.runner(spec, self.ctx)
            model = self.ctx.load(model_cfg, result.entry, self.tcfg.distill_from, spec.data)
            result = StageResult(result.row, result.entry, model)
        self.teacher_model = result.model
        return result

    def teacher_spec(self, model_cfg, all_labels: bool = False) -> StageSpec:
        """A teacher stage: its own seed stream (it never shares init or batch order with
        a student), on the labelled examples or, with ``all_labels``, the transfer set's
        true labels too where they exist."""
        data, key = (all_labels_data(self.data, self.transfer_digest)
                     if all_labels else None) or (self.data.teacher_data or self.data, {})
        return StageSpec("teacher", model_cfg, CE, self.cfg.seed,
                         seed_stream("teacher", self.cfg.seed),
                         self.tcfg.teacher_epochs or self.tcfg.epochs, data, key)

    @property
    def student_epochs(self) -> int:
        """The epochs of every student stage (scratch and distilled alike)."""
        return self.tcfg.student_epochs or self.tcfg.epochs

    def student(self, role: str, make_loss, seed: int, teacher: TeacherTargets | None = None,
                teacher_key: str | None = None, model_cfg=None, loss_cfg=None,
                train_seed: int | None = None) -> StageResult:
        """Scratch and distilled students of one seed share init, data order and
        optimiser: the model is built after seeding with ``seed`` in both cases
        (``train_seed``, when given, seeds a student that must not share them, e.g. an
        intermediate born-again generation)."""
        model_cfg = model_cfg if model_cfg is not None else self.float_student
        spec = StageSpec(role, model_cfg, make_loss, seed,
                         seed if train_seed is None else train_seed, self.student_epochs,
                         self.data, teacher=teacher)
        if role not in SCRATCH_ROLES:  # a distilled student depends on its loss and teacher
            if loss_cfg is None:
                loss_cfg = OmegaConf.to_container(self.cfg.loss, resolve=True)
            spec = self.taught(spec, loss_key(loss_cfg), teacher_key)
        return self.runner(spec, self.ctx)

    def taught(self, spec: StageSpec, loss: str, teacher_key: str | None) -> StageSpec:
        """A distilled student's spec: its key holds its loss and its teacher, and with a
        transfer set it also learns from that set, whose hash its key holds."""
        taught = spec.teacher is not None
        key = {"loss": loss, "teacher": teacher_key if taught else None,
               "distill_from": self.tcfg.distill_from if taught else None,
               "teacher_targets": type(spec.teacher).__name__ if taught else None}
        data = spec.data
        if taught:  # what top-k or on-policy targets add (only they: other keys unchanged)
            key.update(spec.teacher.stage_key)
        if taught and self.transfer_digest:
            key["transfer"], data = self.transfer_digest, self.taught_data
        return dataclasses.replace(spec, key=key, data=data)

    def all_labels_student(self, seed: int) -> StageResult | None:
        """The "scratch, all labels" reference of ``seed`` (kdrun/run/all_labels.py); None
        when the transfer set's labels are unknown."""
        spec = reference_spec(self.data, self.transfer_digest, self.float_student, seed,
                              self.student_epochs)
        return None if spec is None else self.runner(spec, self.ctx)

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
        key = {"loss": loss_key(settings), "teacher": teacher.entry.key,
               "distill_from": self.tcfg.distill_from, "teacher_targets": "generated"}
        return self.runner(StageSpec("distilled", self.float_student, make_game, seed, seed,
                                     self.student_epochs, data, key, teacher,
                                     train=fit_data_free), self.ctx)

    @property
    def float_student(self):
        """The student's config as a float32 model (``student.quantize`` unset): what every
        stage trains unless it asks for the quantisation-aware one (``cfg.student``)."""
        student = self.cfg.student.copy()
        if student.get("quantize") is not None:
            student.quantize = None
        return student

    def post_training_int8(self, result: StageResult, seed: int) -> SummaryRow:
        """The int8 (PTQ) row of a trained float32 student (kdrun/run/int8_students.py)."""
        return int8_students.ptq_row(
            result.row, lambda which: self.ctx.load(self.float_student, result.entry, which),
            self.data, self.tcfg)

    def load_student(self, result: StageResult) -> torch.nn.Module:
        """A finished student, with the weights ``trainer.distill_from`` asks for."""
        return self.ctx.load(self.cfg.student, result.entry, self.tcfg.distill_from)

    def add_transfer(self, examples: Split) -> None:
        """More unlabelled examples for the distilled students (e.g. text the teacher
        wrote: scheme=sequence_kd), after the transfer set there is; their content is
        part of the distilled stages' keys, as the transfer set's is."""
        transfer = (examples if self.data.transfer is None
                    else self.data.transfer.joined(examples))
        self.use_data(dataclasses.replace(self.data, transfer=transfer, transfer_labels=None,
                                          transfer_digest=None))

    def use_data(self, data: Data) -> None:
        """The run's data, and what a student taught by a teacher trains on: the transfer
        set too, if there is one, whose hash is part of its key."""
        self.data = self.ctx.data = data
        self.transfer_digest = transfer_fingerprint(data)
        self.taught_data = data if data.transfer is None else data.training_on(
            data.distill_train())

    def teacher_on_data(self, teacher: StageResult) -> TeacherOnData:
        """The teacher and the examples a taught student trains on: what its cached
        targets are computed on (kdrun/train/targets.py)."""
        return TeacherOnData(teacher.model, teacher.entry, self.taught_data, self.tcfg,
                             self.device, self.transfer_digest)

    def teacher_targets(self, teacher: StageResult, loss) -> TeacherTargets:
        """What a distilled student learns from (kdrun/train/targets.py: choose_targets)."""
        cacheable = (self.data.train.in_memory and self.augment is None
                     and self.tcfg.cache_teacher_logits)
        return choose_targets(self.teacher_on_data(teacher), loss, cacheable=cacheable,
                              topk=self.topk, autocast=configure_device(self.tcfg, self.device))

    def teacher_logits(self, teacher: StageResult) -> torch.Tensor:
        """The teacher's logits on every example a taught student trains on."""
        return self.teacher_on_data(teacher).logits()
