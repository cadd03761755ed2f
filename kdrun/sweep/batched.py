"""The work of ``hydra/launcher=batched`` before it runs the jobs: plan every job's
stages and train those that can share a stacked model together (kdrun/train/stacked.py), into
the stage cache: first the teachers (those of a sweep over ``seed`` differ only in their
seed), then the scratch and distilled students.

The launcher then runs each job exactly as the basic launcher would: the pipeline finds
its stages finished in the cache and only evaluates, times and reports. A job whose
students cannot be batched (see ``check_batchable``) trains them itself then, and the
log says why in one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import DictConfig

from kdrun.data import Data
from kdrun.errors import UserError
from kdrun.models import build_model
from kdrun.report.logs import MetricLogs, MetricsLog
from kdrun.run.finish import finish_stage
from kdrun.run.memory_plan import plan_memory
from kdrun.run.pipeline import is_out_of_memory, prepare, set_threads
from kdrun.run.schemes import scheme_of
from kdrun.run.stage import RunContext, StageSpec, run_stage
from kdrun.run.stages import Stages
from kdrun.run.summary_row import StageResult, SummaryRow
from kdrun.run.validate import validate
from kdrun.store.cache import StageEntry
from kdrun.store.faults import storage_fault
from kdrun.store.files import RunDir, load_sealed, save_sealed
from kdrun.train.stacked import Member, NotBatchable, check_batchable, train_group
from kdrun.train.targets import LiveTeacher

log = logging.getLogger("kdrun")
# Stage-key fields in which the members of one group may differ
PER_MEMBER = ("stage", "seed", "loss", "teacher", "distill_from", "teacher_targets")
# Members per stacked pass when hydra.launcher.max_members is null: a bound on memory
DEFAULT_MAX_MEMBERS = {"cpu": 64, "cuda": 512}
GROUPS = "groups"  # <cache dir>/groups/<hash of the members' keys>.pt: a pass's saved state


class StagePlan:
    """A job's stages as its scheme asks for them, through the Stages runner seam: each
    student stage that is not in the cache yet becomes a Member for a stacked group
    instead of training. Teachers are trained (or reused) as usual."""

    def __init__(self, cfg: DictConfig, data: Data, device, run_dir: RunDir,
                 teacher_topk: int | None = None):
        if not data.train.in_memory:
            raise NotBatchable("its data is read from disk (a DataLoader per run)")
        self.cfg, self.device, self.planned = cfg, device, []
        self.stages = PlanningStages(
            cfg, data, device, run_dir, teacher_topk=teacher_topk, runner=self.run,
            # a plan's own metrics.csv only: the job's run, later, logs to TensorBoard or MLflow
            metrics=lambda context: MetricLogs([MetricsLog(run_dir.metrics_csv, context.run)]))

    def run(self, spec: StageSpec, ctx: RunContext) -> StageResult:
        if spec.role == "teacher":
            return run_stage(spec, ctx)
        if spec.role not in ("scratch", "distilled"):
            raise NotBatchable(f"scheme={self.cfg.scheme.name} trains a {spec.role} stage of "
                               f"its own")
        if spec.teacher is not None and spec.teacher.stack_refusal:
            raise NotBatchable(spec.teacher.stack_refusal)
        entry = self.plan(spec, ctx)
        placeholder = SummaryRow.evaluated_teacher(
            ctx.row_context, "planned", {"params": 0, "size_mb": 0.0}, math.nan, math.nan,
            train_seconds=0.0, reused=False).as_role(spec.role)
        return StageResult(placeholder, entry)

    def plan_teachers(self, scheme) -> None:
        """The scheme's first teachers, listed, not trained (teachers that differ only in
        their seed train as one stacked model), where the cache does not hold them."""
        for model_cfg, all_labels in scheme.teacher_stages(self.cfg):
            if not model_cfg.get("checkpoint"):
                self.plan(self.stages.teacher_spec(model_cfg, all_labels), self.stages.ctx)

    def plan(self, spec: StageSpec, ctx: RunContext) -> StageEntry:
        """List the stage, which trains on ``spec.data`` (with a transfer set, a distilled
        student's differs from a scratch one's: they group apart, as their keys do), as a
        Member, unless the cache already holds it; NotBatchable when its model or loss
        cannot train stacked. Returns its cache entry."""
        entry = ctx.entry(spec)
        if entry.done():
            return entry
        loss = spec.make_loss()
        data = spec.data  # a teacher's own data where it reads another view
        check_batchable(build_model(spec.model_cfg, data.input_shape, data.num_classes,
                                    spec.role, data.graph), loss, ctx.tcfg, self.device)
        self.planned.append(Member(
            entry=entry, role=spec.role, seed=spec.seed, train_seed=spec.train_seed,
            model_cfg=spec.model_cfg, loss=loss, targets=spec.teacher,
            teacher_key=spec.key.get("teacher"), cfg=self.cfg, context=ctx.row_context,
            data=spec.data, device=self.device))
        return entry


class PlanningStages(Stages):
    """What a scheme may ask of a plan besides its stages: nothing that needs a trained
    student."""

    def load_student(self, result):
        raise NotBatchable(f"scheme={self.cfg.scheme.name} teaches with a trained student")

    def post_training_int8(self, result, seed):
        raise NotBatchable("student.quantize=int8 quantises its trained students")


def train_sweep_stages(job_cfgs: list[DictConfig], work_dir: Path,
                       max_members: int | None = None) -> int:
    """Plan every job's teachers, train those that can batch in stacked groups; then plan
    the students (the remaining teachers train as usual on the way) and train them in
    stacked groups. Returns how many stages were trained stacked."""
    trained = 0
    for teachers in (True, False):
        planned = []
        for number, cfg in enumerate(job_cfgs):
            try:
                planned += plan_job(cfg, work_dir / f"job{number}", teachers)
            except NotBatchable as e:
                if not teachers:
                    log.info("batched launcher: job #%d trains its students on its own: %s",
                             number, e)
            except UserError:
                pass  # the job stops with its own one-line message when it runs
        shutil.rmtree(work_dir, ignore_errors=True)
        trained += sum(train_or_leave(members, max_members)
                       for members in group_members(planned))
    return trained


def train_or_leave(members: list[Member], max_members: int | None) -> int:
    """``train_planned_group``; a group that runs out of memory or disk leaves its stages
    to their jobs, which train them alone (a smaller need) or fail with their own line."""
    try:
        return train_planned_group(members, max_members)
    except Exception as e:
        fault = storage_fault(e)
        if fault is None and not is_out_of_memory(e):
            raise
        log.warning("batched launcher: a stacked group of %d stopped (%s); their jobs train "
                    "them alone", len(members),
                    fault if fault is not None else "out of memory")
        return 0


def plan_job(cfg: DictConfig, work_dir: Path, teachers: bool = False) -> list[Member]:
    """The stages ``cfg``'s job will train, untrained: its first ``teachers``, or the
    students its scheme asks for. The device, threads and data are set up as the job's own
    run sets them up, so that the stage keys are the ones the job will look for."""
    validate(cfg)
    scheme = scheme_of(cfg)
    if not teachers and not scheme.batchable:
        raise NotBatchable(f"scheme={scheme.name} trains its students one after another")
    device, data = prepare(cfg)
    # the teacher targets the job's own run will choose (its memory plan), so that the
    # planned stages' keys are the ones it looks for, and no full cache that would not fit
    plan = StagePlan(cfg, data, device, RunDir(work_dir),
                     teacher_topk=plan_memory(cfg, data, device).teacher_topk)
    try:
        if teachers:
            plan.plan_teachers(scheme)
        else:
            scheme.run(plan.stages, cfg)
    finally:
        plan.stages.metrics.close()
    return plan.planned


def group_members(members: list[Member]) -> list[list[Member]]:
    """Members whose stage keys agree but for the PER_MEMBER fields: same data, split,
    student, trainer settings, epochs and numerics. A stage two jobs share is kept once."""
    groups: dict[str, dict[str, Member]] = defaultdict(dict)
    live: dict[str, LiveTeacher] = {}  # each job loaded its teacher: keep one per teacher
    for member in members:
        if member.targets is not None and member.targets.cached_logits is None:
            member.targets = live.setdefault(member.teacher_key, member.targets)
        shared = {k: v for k, v in member.entry.material.items() if k not in PER_MEMBER}
        groups[json.dumps(shared, sort_keys=True)].setdefault(member.entry.key, member)
    return [list(group.values()) for group in groups.values()]


def train_planned_group(members: list[Member], max_members: int | None) -> int:
    """Train a group's members in passes of at most ``max_members`` (in stage-key order,
    so a re-run forms the same passes and resumes them). Returns how many stages were
    finished."""
    members = sorted(members, key=lambda m: m.entry.key)
    limit = max_members or DEFAULT_MAX_MEMBERS.get(members[0].device.type, 64)
    return sum(_train_pass(members[i:i + limit]) for i in range(0, len(members), limit))


def _train_pass(members: list[Member]) -> int:
    """One stacked pass, every member's entry locked throughout. A member finished
    meanwhile by another process is skipped; one that a killed sequential run left with
    a state of its own is left to resume alone."""
    with contextlib.ExitStack() as locks:
        todo = []
        for member in members:
            locks.enter_context(member.entry.lock())
            if member.entry.done():
                continue
            if load_sealed(member.entry.state_pt) is not None:
                log.info("batched launcher: %s stage %s resumes alone from its saved state",
                         member.role, member.entry.key)
                continue
            todo.append(member)
        if not todo:
            return 0
        name = hashlib.sha256("+".join(m.entry.key for m in todo).encode()).hexdigest()[:20]
        state_path = todo[0].entry.root / GROUPS / f"{name}.pt"
        resume = load_sealed(state_path)
        if resume is not None and resume["keys"] != [m.entry.key for m in todo]:
            resume = None
        for member in todo:
            member.entry.start(group_epoch=resume["epoch"] if resume else 0)
        return _train(todo, resume, state_path)


def _train(members: list[Member], resume: dict | None, state_path: Path) -> int:
    first = members[0]
    epochs = first.entry.material["epochs"]
    kind = "teacher" if first.role == "teacher" else "student"
    log.info("batched launcher: training %d %s%s as one stacked model (%s, epochs %d-%d)",
             len(members), kind, "s" if len(members) > 1 else "", first.model_cfg.arch,
             (resume["epoch"] if resume else 0) + 1, epochs)

    def on_failure(member: Member, message: str) -> None:
        log.warning("batched launcher: %s; its job will train it alone and report it",
                    message)

    state_path.parent.mkdir(parents=True, exist_ok=True)
    # jobs of other thread counts may share a group: the first's
    set_threads(first.cfg, first.data, first.device)
    threads = {"threads": torch.get_num_threads()}  # what each member's row records
    results = train_group(members, first.data, first.cfg.trainer, epochs, first.device,
                          lambda member, rows: member.entry.append_rows(rows), on_failure,
                          resume=resume, save_state=lambda state: save_sealed(state_path, state))
    finished = 0
    for member, result in zip(members, results):
        if result is None:
            continue
        model, fit_result = result
        finish_stage(member.entry, model, member.loss, fit_result, role=member.role,
                     seed=member.seed, train_seed=member.train_seed, model_cfg=member.model_cfg,
                     data=member.data, cfg=member.cfg,
                     context=member.context.with_provenance(threads),
                     trained_in=f"a stacked batch of {len(members)}")
        finished += 1
    state_path.unlink(missing_ok=True)
    return finished
