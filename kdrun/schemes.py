"""Distillation schemes: who teaches whom. Each returns the run's summary rows, in
the order teacher, then per student seed: scratch, distilled (and any intermediate
generations). To add one: write its function here with ``@SCHEMES.register("name",
rules={...})`` (a check for each of its keys) and add ``configs/scheme/<name>.yaml``."""

from __future__ import annotations

import logging

from kdrun.checks import number, one_of
from kdrun.errors import ConfigError
from kdrun.losses import CE, build_loss, soft_target_entropy
from kdrun.measure import AllOf
from kdrun.provenance import seed_stream
from kdrun.registry import Registry
from kdrun.train import CachedLogits, predict_logits

log = logging.getLogger("kdrun")
# name -> scheme(stages, cfg) returning the run's summary rows; the scheme's YAML keys
# (configs/scheme/<name>.yaml, besides name) are checked by the rules it registers with
SCHEMES = Registry("scheme")
# The temperature of the ensemble's combined distribution is the loss's T; a loss with
# none (mse_logits, ce) combines the plain softmax.
ENSEMBLE_T_WITHOUT_LOSS_T = 1.0


def distillation_loss(cfg) -> dict:
    """The loss the distilled student is trained with: the loss group's, except in deep
    mutual learning, whose cohort loss is the scheme's own."""
    from omegaconf import OmegaConf

    if cfg.scheme.name == "dml":
        return {"name": "dml", "T": cfg.scheme.T}
    return OmegaConf.to_container(cfg.loss, resolve=True)


@SCHEMES.register("offline")
def offline(stages, cfg) -> list[dict]:
    """The classic scheme (Hinton et al. 2015): a teacher trained first (or given as a
    checkpoint) and frozen; each student seed trained from scratch and distilled."""
    teacher, entry, rows = stages.teacher(cfg.teacher)
    targets, extra = _teacher_targets(stages, cfg, teacher, entry)
    return rows + _students(stages, cfg, targets, entry.key, extra)


def _students(stages, cfg, targets, teacher_key: str, extra: dict) -> list[dict]:
    """Per student seed: the scratch row, then the row distilled from ``targets``."""
    rows = []
    for seed in stages.student_seeds:
        rows.append(stages.student("scratch", CE, seed)[1])
        _, row = stages.student("distilled", lambda: build_loss(cfg.loss), seed, targets,
                                teacher_key)
        rows.append({**row, **extra})
    return rows


@SCHEMES.register("born_again", rules={"generations": number(1, integer=True)})
def born_again(stages, cfg) -> list[dict]:
    """Born-again networks, Furlanello et al. 2018 (ICML): self-distillation. The
    teacher is the student's own architecture trained on the labels (generation 0);
    generation k is distilled from generation k-1, for ``scheme.generations``
    generations. The last generation is the row ``distilled``; earlier ones are
    ``generation1``, ``generation2``, ... in the summary. Generation 0 is trained on
    the teacher's seed stream, so no generation shares its teacher's init."""
    teacher, entry, rows = stages.teacher(cfg.student)
    generations = cfg.scheme.generations
    for seed in stages.student_seeds:
        rows.append(stages.student("scratch", CE, seed)[1])
        model, previous = teacher, entry
        for generation in range(1, generations + 1):
            role = "distilled" if generation == generations else f"generation{generation}"
            targets, extra = _teacher_targets(stages, cfg, model, previous)
            # the last generation shares the scratch student's init and batch order; each
            # earlier one has a stream of its own, so no generation starts as its teacher did
            rng = None if generation == generations else seed_stream(role, seed)
            previous, row = stages.student(role, lambda: build_loss(cfg.loss), seed, targets,
                                           previous.key, rng=rng)
            rows.append({**row, "generation": generation, **extra})
            model = stages.load_student(previous)
    return rows


def _teacher_targets(stages, cfg, teacher, entry):
    """What the distilled student learns from, and how soft those targets are."""
    loss = build_loss(cfg.loss)
    if not loss.needs_teacher:
        log.info("loss=%s uses no teacher: the distill stage repeats scratch training "
                 "(a control; its gain should be about zero)", cfg.loss.name)
        return None, {}
    targets = stages.teacher_targets(teacher, entry, loss)
    if "T" not in cfg.loss:
        return targets, {}
    logits = stages.teacher_logits(teacher, entry)  # the unaugmented training set
    return targets, {"soft_target_entropy": soft_target_entropy(logits, cfg.loss.T)}


@SCHEMES.register("ensemble", rules={
    "combine": one_of("arithmetic", "geometric"),
    "teachers": lambda v: None if isinstance(v, list) and v else (
        "must be a list of {option: NAME, ...} entries")})
def ensemble(stages, cfg) -> list[dict]:
    """Multi-teacher distillation (e.g. Hinton et al. 2015, §2; You et al. 2017): several
    teachers, each trained (or loaded) as in ``offline``; the student learns their
    softened distributions combined by an arithmetic or geometric mean
    (``scheme.combine``). Members are the summary's ``teacher1``, ``teacher2``, ...;
    the combined ensemble is its ``teacher`` row."""
    if not stages.data.train.in_memory or stages.augment is not None:
        raise ConfigError("dataset", cfg.dataset.name, "scheme=ensemble needs in-memory data "
                          "without augmentation (its teachers' logits are computed once)")
    T = float(cfg.loss.get("T", ENSEMBLE_T_WITHOUT_LOSS_T))
    members, rows = [], []
    for i, spec in enumerate(cfg.scheme.teachers, start=1):
        model, entry, (row,) = stages.teacher(teacher_config(spec))
        members.append((model, entry))
        rows.append({**row, "role": f"teacher{i}"})
    logits = [stages.teacher_logits(model, entry) for model, entry in members]
    combined = combine(logits, T, cfg.scheme.combine)
    rows.insert(0, _ensemble_row(stages, members, rows, cfg.scheme.combine, T))
    key = "+".join(entry.key for _, entry in members) + f"|{cfg.scheme.combine}|T={T}"
    extra = {"soft_target_entropy": soft_target_entropy(combined, T)} if "T" in cfg.loss else {}
    return rows + _students(stages, cfg, CachedLogits(combined), key, extra)


def _ensemble_row(stages, members, member_rows, how: str, T: float) -> dict:
    """The combined teacher's summary row: its accuracy from the combined predictions,
    its size the members' summed; it is timed as all members run in turn."""
    accuracy = {}
    for name, split in (("val", stages.data.val), ("test", stages.data.test)):
        split = split.to(stages.device)
        logits = [predict_logits(m, split, stages.cfg.trainer.eval_batch_size)
                  for m, _ in members]
        hits = combine(logits, T, how).argmax(1) == split.y
        accuracy[name] = hits.float().mean().item() * 100
    stages.teacher_model = AllOf([m for m, _ in members])
    total = {k: sum(r[k] for r in member_rows) for k in ("params", "size_mb")}
    return stages.evaluated_teacher_row(
        f"ensemble[{','.join(r['arch'] for r in member_rows)}]", total, accuracy["val"],
        accuracy["test"], train_seconds=sum(r["train_seconds"] for r in member_rows),
        reused=False, combine=how)


def teacher_config(spec):
    """A member of ``scheme.teachers``: ``{option: NAME, ...overrides}`` where NAME is a
    configs/teacher/ option (cnn, mlp, resnet18, ...) and overrides any of its keys,
    ``checkpoint`` included."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(spec, resolve=True)
    option = spec.pop("option")
    base = OmegaConf.create((files("kdrun.configs") / "teacher" / f"{option}.yaml").read_text())
    return OmegaConf.merge(base, spec)


def combine(logits: list, T: float, how: str):
    """Logits whose softmax at temperature T is the arithmetic or geometric mean of the
    members' softmax(logits / T): T * log(mean p) or T * mean(log p)."""
    import torch

    log_p = torch.stack([torch.log_softmax(z / T, dim=1) for z in logits])
    if how == "geometric":
        return T * log_p.mean(0)  # softmax renormalises the geometric mean
    return T * (torch.logsumexp(log_p, 0) - torch.log(torch.tensor(float(len(logits)))))


@SCHEMES.register("dml", rules={"students": number(2, integer=True),
                               "T": number(0, lo_open=True)})
def dml(stages, cfg) -> list[dict]:
    """Deep mutual learning, Zhang et al. 2018 (CVPR): ``scheme.students`` copies of the
    student architecture trained together, each learning from the others (losses/
    mutual.py); no pre-trained teacher, and the loss group is not used. The cohort's
    first member is the ``distilled`` row, compared with the scratch student that has
    its init."""
    from omegaconf import OmegaConf

    from kdrun.losses import DML

    cohort = OmegaConf.create({"arch": "cohort", "size": cfg.scheme.students,
                               "member": OmegaConf.to_container(cfg.student, resolve=True)})
    rows = []
    for seed in stages.student_seeds:
        rows.append(stages.student("scratch", CE, seed)[1])
        _, row = stages.student("distilled", lambda: DML(T=cfg.scheme.T), seed,
                                model_cfg=cohort, loss_cfg=distillation_loss(cfg))
        rows.append(row)
    return rows

