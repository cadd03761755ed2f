"""Multi-teacher distillation: several teachers, their softened distributions combined."""

from __future__ import annotations

from importlib.resources import files
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf

from kdrun.checks import one_of
from kdrun.errors import ConfigError
from kdrun.losses import loss_class, soft_target_entropy
from kdrun.report.measure import AllOf
from kdrun.run.schemes.base import SCHEMES, Scheme, taught_students
from kdrun.run.summary_row import StageResult, SummaryRow
from kdrun.train.targets import CachedLogits, predict_logits

if TYPE_CHECKING:
    from kdrun.run.stages import Stages

# The temperature of the ensemble's combined distribution is the loss's T; a loss with
# none (mse_logits, ce) combines the plain softmax.
ENSEMBLE_T_WITHOUT_LOSS_T = 1.0


@SCHEMES.register("ensemble")
class Ensemble(Scheme):
    """Multi-teacher distillation (e.g. Hinton et al. 2015, §2; You et al. 2017): several
    teachers, each trained (or loaded) as in ``offline``; the student learns their
    softened distributions combined by an arithmetic or geometric mean (``combine``).
    Members are the summary's ``teacher1``, ``teacher2``, ...; the combined ensemble is
    its ``teacher`` row."""

    config_rules = {
        "combine": one_of("arithmetic", "geometric"),
        "teachers": lambda v: None if isinstance(v, list) and v else (
            "must be a list of {option: NAME, ...} entries")}
    roles = ("teacher", "teacher1", "teacher2", "scratch", "distilled")  # teacherN: per member
    all_labels_reference = True

    def __init__(self, teachers: list, combine: str = "arithmetic"):
        self.teachers, self.combine = list(teachers), combine

    def check(self, cfg: DictConfig) -> None:
        options = teacher_options()
        for i, spec in enumerate(self.teachers):
            option = spec.get("option") if isinstance(spec, dict) else None
            if option not in options:
                raise ConfigError(f"scheme.teachers[{i}].option", option,
                                  f"must be one of {', '.join(options)}")
        if loss_class(cfg.loss).reads_features:
            raise ConfigError("loss", cfg.loss.name, "scheme=ensemble combines the teachers' "
                              "logits: use a logit-based loss (kd, dkd, dist, mse_logits, ce)")

    def models(self, cfg: DictConfig) -> list[tuple[str, DictConfig]]:
        return [(f"scheme.teachers[{i}]", teacher_config(spec))
                for i, spec in enumerate(self.teachers)]

    def teacher_stages(self, cfg: DictConfig) -> list[tuple[DictConfig, bool]]:
        return [(teacher_config(spec), False) for spec in self.teachers]

    def feature_teacher(self, cfg: DictConfig):
        return None  # logits only (check)

    def verdict_scope(self, cfg: DictConfig) -> str:
        return f"one ensemble of {len(self.teachers)} teachers (seed {cfg.seed})"

    def run(self, stages: Stages, cfg: DictConfig) -> list[SummaryRow]:
        if not stages.data.train.in_memory or stages.augment is not None:
            raise ConfigError("dataset", cfg.dataset.name, "scheme=ensemble needs in-memory "
                              "data without augmentation (its teachers' logits are computed "
                              "once)")
        T = float(cfg.loss.get("T", ENSEMBLE_T_WITHOUT_LOSS_T))
        members = [stages.teacher(teacher_config(spec)) for spec in self.teachers]
        combined = combine([stages.teacher_logits(m) for m in members], T, self.combine)
        stages.teacher_model = AllOf([m.model for m in members])  # timed: members in turn
        rows = [_ensemble_row(stages, members, self.combine, T)]
        rows += [m.row.as_role(f"teacher{i}") for i, m in enumerate(members, start=1)]
        key = "+".join(m.entry.key for m in members) + f"|{self.combine}|T={T}"
        columns = {"soft_target_entropy": soft_target_entropy(combined, T)} \
            if "T" in cfg.loss else {}
        return rows + taught_students(stages, cfg, CachedLogits(combined), key, columns)


def _ensemble_row(stages: Stages, members: list[StageResult], how: str, T: float) -> SummaryRow:
    """The combined teacher's summary row: its accuracy from the combined predictions,
    its size the members' summed."""
    accuracy = {}
    for name, split in (("val", stages.data.val), ("test", stages.data.test)):
        split = split.to(stages.device, stages.dtype)
        logits = [predict_logits(m.model, split, stages.tcfg.eval_batch_size) for m in members]
        accuracy[name] = stages.data.metric.compute(combine(logits, T, how), split.y)
    arch = f"ensemble[{','.join(m.row.arch for m in members)}]"
    size = {"params": sum(m.row.params for m in members),
            "size_mb": sum(m.row.size_mb for m in members)}
    return SummaryRow.evaluated_teacher(
        stages.row_context, arch, size, accuracy["val"],
        accuracy["test"], train_seconds=sum(m.row.train_seconds for m in members),
        reused=False, combine=how)


def teacher_options() -> list[str]:
    """The options of the teacher group (configs/teacher/*.yaml)."""
    folder = files("kdrun.configs") / "teacher"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir()
                  if p.name.endswith(".yaml"))


def teacher_config(spec):
    """A member of ``scheme.teachers``: ``{option: NAME, ...overrides}`` where NAME is a
    configs/teacher/ option (cnn, mlp, resnet18, ...) and overrides any of its keys,
    ``checkpoint`` included."""
    spec = OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else dict(spec)
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
