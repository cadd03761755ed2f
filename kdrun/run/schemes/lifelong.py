"""Lifelong learning: one learner meets a sequence of tasks, and distillation from its own
previous copy keeps what it knew (Learning without Forgetting)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf

from kdrun.checks import number, one_of
from kdrun.data.tasks import (
    SETTINGS,
    TaskSequence,
    masked_accuracy,
    rows_of,
    task_data,
    task_sequence,
)
from kdrun.errors import ConfigError
from kdrun.losses import build_loss, loss_class
from kdrun.losses.base import term_weights
from kdrun.losses.lifelong import TaskLoss
from kdrun.report.lifelong import METHODS, lifelong_report
from kdrun.run.provenance import loss_key
from kdrun.run.schemes.base import SCHEMES, Scheme
from kdrun.run.stage import StageSpec
from kdrun.run.summary_row import StageResult, SummaryRow
from kdrun.train.targets import CachedLogits, predict_logits

if TYPE_CHECKING:
    from kdrun.run.stages import Stages


def class_order(v) -> str | None:
    ok = v is None or (isinstance(v, list) and all(isinstance(c, int) and not isinstance(c, bool)
                                                   for c in v))
    return None if ok else "must be null or a list of class numbers, e.g. [0, 1, 2, 3]"


@SCHEMES.register("lifelong")
class Lifelong(Scheme):
    """Learning without Forgetting, Li & Hoiem 2016 (ECCV). The data's classes arrive as
    ``tasks`` tasks; the student architecture learns them in turn, each task's stage
    starting from the previous one's last weights. Per student seed, three learners share
    the first task's stage: ``finetune`` (the new task's labels alone: it forgets),
    ``lwf`` (and the loss group's teacher term on the earlier tasks' outputs, its copy
    before the task as the teacher, on the new task's inputs) and ``joint`` (every task
    seen so far, its data kept: the upper bound). Rows: ``task1``, then
    ``<learner>_task<k>``; the table is the accuracy on every task after each
    (kdrun/report/lifelong.py)."""

    config_rules = {"tasks": number(2, integer=True), "class_order": class_order,
                    "setting": one_of(*SETTINGS)}
    roles = ("task1", "finetune_task2", "lwf_task2", "joint_task2")  # ... to the last task
    has_teacher = False  # each task's teacher is the learner's previous copy
    uses_transfer_set = False
    batchable = False  # each task's stage starts from the one before: trained in turn
    data_parallel = False

    def __init__(self, tasks: int = 5, class_order: list | None = None, setting: str = "task"):
        self.tasks, self.setting = int(tasks), setting
        self.class_order = None if class_order is None else list(class_order)

    def check(self, cfg: DictConfig) -> None:
        loss = loss_class(cfg.loss)
        if loss.reads_features or not loss.needs_teacher or "T" not in cfg.loss:
            raise ConfigError("loss.name", cfg.loss.name,
                              "scheme=lifelong keeps the earlier tasks' outputs with a loss "
                              "that reads logits and weights a teacher term (kd, the "
                              "divergences, dkd, ...)")
        if cfg.split.get("labeled") is not None:
            raise ConfigError("split.labeled", cfg.split.labeled,
                              "scheme=lifelong learns every task from its labels: null")

    def check_data(self, cfg: DictConfig, data) -> None:
        if data.per_position or data.paired or data.graph is not None:
            raise ConfigError("dataset.name", cfg.dataset.name, "scheme=lifelong needs a "
                              "classification data set of examples (e.g. mnist1d, mnist)")
        self.sequence(data.num_classes)  # a bad order or task count: one line now

    def sequence(self, num_classes: int) -> TaskSequence:
        return task_sequence(num_classes, self.tasks, self.class_order, self.setting)

    def feature_teacher(self, cfg: DictConfig):
        return None

    def verdict_scope(self, cfg: DictConfig) -> None:
        return None  # no teacher of its own: the student seeds are all there is

    def objective(self, cfg: DictConfig, over) -> dict:
        anything = torch.ones(1, 1, dtype=torch.bool)
        lwf = TaskLoss(anything, [[0]], build_loss(cfg.loss), Learners.hard_weight(cfg))
        return {"distilled": lwf.objective(over), "plain": TaskLoss(anything).objective(over),
                "names": ("LwF", "fine-tune, joint and the first task"),
                "plain_roles": ("task1", "finetune", "joint")}

    def selected_role(self, cfg: DictConfig) -> str:
        return f"lwf_task{self.tasks}"

    def report(self, summary, header: str, run_dir) -> tuple[str, str]:
        return lifelong_report(summary, header, run_dir.root)

    def run(self, stages: Stages, cfg: DictConfig) -> list[SummaryRow]:
        sequence = self.sequence(stages.data.num_classes)
        rows = []
        for seed in stages.student_seeds:
            learners = Learners(stages, cfg, sequence, seed)
            rows += learners.all_tasks()
        return rows


class Learners:
    """One student seed's learners through the task sequence."""

    def __init__(self, stages: Stages, cfg: DictConfig, sequence: TaskSequence, seed: int):
        self.stages, self.cfg, self.sequence, self.seed = stages, cfg, sequence, seed
        self.model_cfg = stages.float_student
        self.loss_key = loss_key(OmegaConf.to_container(cfg.loss, resolve=True))
        self.ce_weight = self.hard_weight(cfg)

    @staticmethod
    def hard_weight(cfg: DictConfig) -> float:
        """LwF's weight of the new task's CE: the loss group's hard-label weight."""
        loss = cfg.loss
        return term_weights(loss.get("alpha"), loss.get("ce_weight"), loss.get("kd_weight"))[0]

    def all_tasks(self) -> list[SummaryRow]:
        first, row = self.learn("task", 0, None)
        rows, last = [row], dict.fromkeys(METHODS, first)
        for task in range(1, len(self.sequence)):
            for method in METHODS:
                last[method], row = self.learn(method, task, last[method])
                rows.append(row)
        return rows

    def learn(self, method: str, task: int, previous: StageResult | None
              ) -> tuple[StageResult, SummaryRow]:
        """Train (or reuse) ``method``'s stage of ``task`` (0-based) from ``previous``;
        its row holds the test accuracy on every task seen."""
        tasks = list(range(task + 1)) if method == "joint" else [task]
        data = task_data(self.stages.data, self.sequence, tasks, upto=task)
        keeps = method == "lwf"
        targets = CachedLogits(self.logits(previous.model, data.train.x)) if keeps else None
        old = self.sequence.old_groups(task) if keeps else []
        allowed = self.sequence.choices(task)

        def make_loss():
            return TaskLoss(allowed, old, build_loss(self.cfg.loss) if keeps else None,
                            self.ce_weight)

        role = "task1" if previous is None else f"{method}_task{task + 1}"
        key = {"lifelong": {"setting": self.sequence.setting, "classes": self.sequence.classes,
                            "tasks": tasks, "starts_from": previous and previous.entry.key,
                            "loss": self.loss_key if keeps else "ce"}}
        spec = StageSpec(role, self.model_cfg, make_loss, self.seed, self.seed,
                         self.stages.student_epochs, data, key, targets,
                         init=previous and self.starting_weights(previous))
        result = self.stages.runner(spec, self.stages.ctx)
        model = self.stages.ctx.load(self.model_cfg, result.entry, "last", data)
        learnt = StageResult(result.row, result.entry, model)
        columns = {"learner": "all" if previous is None else method, "task": task + 1,
                   **self.accuracies(model, task)}
        return learnt, result.row.with_columns(**columns)

    def starting_weights(self, previous: StageResult):
        weights = previous.entry.result()["model"]  # its last epoch's: where it went on
        dtype = self.stages.dtype

        def init(model: torch.nn.Module) -> None:
            model.to(dtype)  # first: float64 weights are not rounded to float32
            model.load_state_dict(weights)
        return init

    def accuracies(self, model: torch.nn.Module, task: int) -> dict:
        """Test accuracy on each task seen (``acc_task<k>``), choosing as the setting
        says once tasks 0..``task`` are learnt."""
        metric = masked_accuracy(self.sequence.choices(task))
        columns = {}
        for seen in range(task + 1):
            test = rows_of(self.stages.data.test, list(self.sequence.classes[seen]))
            logits = self.logits(model, test.x)
            columns[f"acc_task{seen + 1}"] = metric.compute(logits, test.y.to(logits.device))
        return columns

    def logits(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        device, dtype = self.stages.device, self.stages.dtype
        model.to(device, dtype)
        return predict_logits(model, x.to(device, dtype), self.stages.tcfg.eval_batch_size)
