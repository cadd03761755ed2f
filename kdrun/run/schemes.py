"""Distillation schemes: who teaches whom. Each returns the run's summary rows, in
the order teacher, then per student seed: scratch, distilled (and any intermediate
generations). To add one: write its function here with ``@SCHEMES.register("name",
rules={...})`` (a check for each of its keys) and add ``configs/scheme/<name>.yaml``."""

from __future__ import annotations

import logging
from importlib.resources import files
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf

from kdrun.checks import number, one_of
from kdrun.errors import ConfigError
from kdrun.losses import CE, DML, build_loss, soft_target_entropy
from kdrun.registry import Registry
from kdrun.report.measure import AllOf
from kdrun.run.provenance import distillation_loss, seed_stream
from kdrun.run.summary_row import StageResult, SummaryRow
from kdrun.train.fit import CachedLogits, TeacherTargets, predict_logits

if TYPE_CHECKING:
    from kdrun.run.stages import Stages

log = logging.getLogger("kdrun")
# name -> scheme(stages: Stages, cfg) returning the run's summary rows; the scheme's YAML keys
# (configs/scheme/<name>.yaml, besides name) are checked by the rules it registers with
SCHEMES = Registry("scheme")
# The temperature of the ensemble's combined distribution is the loss's T; a loss with
# none (mse_logits, ce) combines the plain softmax.
ENSEMBLE_T_WITHOUT_LOSS_T = 1.0


@SCHEMES.register("offline")
def offline(stages: Stages, cfg: DictConfig) -> list[SummaryRow]:
    """The classic scheme (Hinton et al. 2015): a teacher trained first (or given as a
    checkpoint) and frozen; each student seed trained from scratch and distilled."""
    teacher = stages.teacher(cfg.teacher)
    targets, extra = _teacher_targets(stages, cfg, teacher)
    return [teacher.row, *_students(stages, cfg, targets, teacher.entry.key, extra)]


def _students(stages: Stages, cfg: DictConfig, targets: TeacherTargets | None,
              teacher_key: str, extra: dict) -> list[SummaryRow]:
    """Per student seed: the scratch row, then the row distilled from ``targets``."""
    rows = []
    for seed in stages.student_seeds:
        rows.append(stages.student("scratch", CE, seed).row)
        distilled = stages.student("distilled", lambda: build_loss(cfg.loss), seed, targets,
                                   teacher_key)
        rows.append(distilled.row.with_columns(**extra))
        if cfg.get("all_labels_reference"):  # checked beforehand: the labels exist
            rows.append(stages.all_labels_student(seed).row)
    return rows


@SCHEMES.register("born_again", rules={"generations": number(1, integer=True)})
def born_again(stages: Stages, cfg: DictConfig) -> list[SummaryRow]:
    """Born-again networks, Furlanello et al. 2018 (ICML): self-distillation. The
    teacher is the student's own architecture trained on the labels (generation 0);
    generation k is distilled from generation k-1, for ``scheme.generations``
    generations. The last generation is the row ``distilled``; earlier ones are
    ``generation1``, ``generation2``, ... in the summary. Generation 0 is trained on
    the teacher's seed stream, so no generation shares its teacher's init."""
    teacher = stages.teacher(cfg.student)
    rows = [teacher.row]
    generations = cfg.scheme.generations
    for seed in stages.student_seeds:
        rows.append(stages.student("scratch", CE, seed).row)
        previous = teacher
        for generation in range(1, generations + 1):
            role = "distilled" if generation == generations else f"generation{generation}"
            targets, extra = _teacher_targets(stages, cfg, previous)
            # the last generation shares the scratch student's init and batch order; each
            # earlier one has a stream of its own, so no generation starts as its teacher did
            rng = None if generation == generations else seed_stream(role, seed)
            student = stages.student(role, lambda: build_loss(cfg.loss), seed, targets,
                                     previous.entry.key, rng=rng)
            rows.append(student.row.with_columns(generation=generation, **extra))
            previous = StageResult(student.row, student.entry, stages.load_student(student))
    return rows


def _teacher_targets(stages: Stages, cfg: DictConfig,
                     teacher: StageResult) -> tuple[TeacherTargets | None, dict]:
    """What the distilled student learns from, and how soft those targets are."""
    loss = build_loss(cfg.loss)
    if not loss.needs_teacher:
        log.info("loss=%s uses no teacher: the distill stage repeats scratch training "
                 "(a control; its gain should be about zero)", cfg.loss.name)
        return None, {}
    targets = stages.teacher_targets(teacher, loss)
    if "T" not in cfg.loss:
        return targets, {}
    # on the unaugmented training set: the cached logits when they are the targets
    logits = targets.logits if isinstance(targets, CachedLogits) else stages.teacher_logits(
        teacher)
    return targets, {"soft_target_entropy": soft_target_entropy(logits, cfg.loss.T)}


@SCHEMES.register("ensemble", rules={
    "combine": one_of("arithmetic", "geometric"),
    "teachers": lambda v: None if isinstance(v, list) and v else (
        "must be a list of {option: NAME, ...} entries")})
def ensemble(stages: Stages, cfg: DictConfig) -> list[SummaryRow]:
    """Multi-teacher distillation (e.g. Hinton et al. 2015, §2; You et al. 2017): several
    teachers, each trained (or loaded) as in ``offline``; the student learns their
    softened distributions combined by an arithmetic or geometric mean
    (``scheme.combine``). Members are the summary's ``teacher1``, ``teacher2``, ...;
    the combined ensemble is its ``teacher`` row."""
    if not stages.data.train.in_memory or stages.augment is not None:
        raise ConfigError("dataset", cfg.dataset.name, "scheme=ensemble needs in-memory data "
                          "without augmentation (its teachers' logits are computed once)")
    T = float(cfg.loss.get("T", ENSEMBLE_T_WITHOUT_LOSS_T))
    members = [stages.teacher(teacher_config(spec)) for spec in cfg.scheme.teachers]
    combined = combine([stages.teacher_logits(m) for m in members], T, cfg.scheme.combine)
    stages.teacher_model = AllOf([m.model for m in members])  # timed: members in turn
    rows = [_ensemble_row(stages, members, cfg.scheme.combine, T)]
    rows += [m.row.as_role(f"teacher{i}") for i, m in enumerate(members, start=1)]
    key = "+".join(m.entry.key for m in members) + f"|{cfg.scheme.combine}|T={T}"
    extra = {"soft_target_entropy": soft_target_entropy(combined, T)} if "T" in cfg.loss else {}
    return rows + _students(stages, cfg, CachedLogits(combined), key, extra)


def _ensemble_row(stages: Stages, members: list[StageResult], how: str, T: float) -> SummaryRow:
    """The combined teacher's summary row: its accuracy from the combined predictions,
    its size the members' summed."""
    accuracy = {}
    for name, split in (("val", stages.data.val), ("test", stages.data.test)):
        split = split.to(stages.device, stages.dtype)
        logits = [predict_logits(m.model, split, stages.tcfg.eval_batch_size) for m in members]
        hits = combine(logits, T, how).argmax(1) == split.y
        accuracy[name] = hits.float().mean().item() * 100
    arch = f"ensemble[{','.join(m.row.arch for m in members)}]"
    size = {"params": sum(m.row.params for m in members),
            "size_mb": sum(m.row.size_mb for m in members)}
    return SummaryRow.evaluated_teacher(
        stages.row_context, arch, size, accuracy["val"],
        accuracy["test"], train_seconds=sum(m.row.train_seconds for m in members),
        reused=False, combine=how)


def teacher_config(spec):
    """A member of ``scheme.teachers``: ``{option: NAME, ...overrides}`` where NAME is a
    configs/teacher/ option (cnn, mlp, resnet18, ...) and overrides any of its keys,
    ``checkpoint`` included."""
    spec = OmegaConf.to_container(spec, resolve=True)
    option = spec.pop("option")
    base = OmegaConf.create((files("kdrun.configs") / "teacher" / f"{option}.yaml").read_text())
    return OmegaConf.merge(base, spec)


def combine(logits: list[torch.Tensor], T: float, how: str) -> torch.Tensor:
    """Logits whose softmax at temperature T is the arithmetic or geometric mean of the
    members' softmax(logits / T): T * log(mean p) or T * mean(log p)."""
    log_p = torch.stack([torch.log_softmax(z / T, dim=1) for z in logits])
    if how == "geometric":
        return T * log_p.mean(0)  # softmax renormalises the geometric mean
    return T * (torch.logsumexp(log_p, 0) - torch.log(torch.tensor(float(len(logits)))))


@SCHEMES.register("dml", rules={"students": number(2, integer=True),
                               "T": number(0, lo_open=True)})
def dml(stages: Stages, cfg: DictConfig) -> list[SummaryRow]:
    """Deep mutual learning, Zhang et al. 2018 (CVPR): ``scheme.students`` copies of the
    student architecture trained together, each learning from the others (losses/
    mutual.py); no pre-trained teacher, and the loss group is not used. The cohort's
    first member is the ``distilled`` row, compared with the scratch student that has
    its init."""
    cohort = OmegaConf.create({"arch": "cohort", "size": cfg.scheme.students,
                               "member": OmegaConf.to_container(cfg.student, resolve=True)})
    rows = []
    for seed in stages.student_seeds:
        rows.append(stages.student("scratch", CE, seed).row)
        distilled = stages.student("distilled", lambda: DML(T=cfg.scheme.T), seed,
                                   model_cfg=cohort, loss_cfg=distillation_loss(cfg))
        rows.append(distilled.row)
    return rows

