"""int8 students (``student.quantize=int8``), an add-on to a run's float32 students
(kdrun/run/add_ons.py): each
trained student quantised after training (PTQ, its activation ranges calibrated on the
labelled training examples), and the quantisation-aware stages (QAT, trained with
fake-quantised weights and activations) converted to int8 when they finish. Their rows
hold the int8 model's metrics and size."""

from __future__ import annotations

import copy
import dataclasses

import torch
from omegaconf import DictConfig

from kdrun.data import Data
from kdrun.errors import ConfigError
from kdrun.losses import CE, build_loss
from kdrun.models import build_model, count_params, describe, example_inputs
from kdrun.models.quantize import fake_quantized, int8_weights, post_training_int8, to_int8
from kdrun.precision import on_gpu
from kdrun.report.measure import size_on_disk_mb
from kdrun.run.summary_row import SummaryRow
from kdrun.train.fit import metric_on


def quantized(model_cfg) -> bool:
    """Whether a model config asks for an int8 model (``quantize: int8``)."""
    return model_cfg.get("quantize") == "int8"


def wanted(cfg) -> bool:
    """Whether the run also makes int8 students."""
    return quantized(cfg.student)


def ptq_row(row: SummaryRow, load, data: Data, tcfg) -> SummaryRow:
    """The row of a trained float32 student quantised to int8 after training (PTQ):
    ``load(weights)`` gives its float32 model with its best_val or last weights, each
    quantised and evaluated as int8."""
    calibration = [x for _, x, _ in data.train.to("cpu", torch.float32).batches(
        tcfg.eval_batch_size)]
    selected, last = (post_training_int8(load(which).cpu(), data.input_shape, calibration)
                      for which in ("best_val", "last"))
    return dataclasses.replace(row, role=f"{row.role}_ptq", cache_key=None, checkpoint=None,
                               **int8_columns(selected, last, data, tcfg))


def converted_int8(fake, result, data: Data, tcfg) -> tuple:
    """A quantisation-aware stage's result as int8: its last and its selected weights
    converted to int8 and evaluated so; and the int8 model's figures (params, size)."""
    selected = copy.deepcopy(fake)
    selected.load_state_dict(result.best_state)
    columns = int8_columns(to_int8(selected), to_int8(fake), data, tcfg)
    size_mb = columns.pop("size_mb")
    return dataclasses.replace(result, **columns), {"params": count_params(fake),
                                                    "size_mb": size_mb}


def int8_columns(selected, last, data: Data, tcfg) -> dict:
    """A student's row columns as int8: the validation and test metric of its selected
    weights' int8 model, the test metric of its last weights', and the size on disk."""
    def metric(model, split) -> float:  # on the CPU, in float32
        return metric_on(model, split.to("cpu", torch.float32), tcfg.eval_batch_size,
                         data.metric)

    return {"val_metric_best": metric(selected, data.val),
            "test_metric_best_val": metric(selected, data.test),
            "test_metric_last": metric(last, data.test),
            "size_mb": round(size_on_disk_mb(selected), 4)}


def rows(stages, cfg: DictConfig, taught) -> list[SummaryRow]:
    """A seed's int8 rows: its scratch and distilled students quantised after training
    (PTQ), and both trained quantisation-aware (QAT, ``cfg.student``)."""
    distill = lambda: build_loss(cfg.loss)  # noqa: E731
    columns, seed = taught.columns, taught.seed
    return [stages.post_training_int8(taught.scratch, seed),
            stages.post_training_int8(taught.distilled, seed).with_columns(**columns),
            stages.student("scratch_qat", CE, seed, model_cfg=cfg.student).row,
            stages.student("distilled_qat", distill, seed, taught.targets, taught.teacher_key,
                           model_cfg=cfg.student).row.with_columns(**columns)]


def check_settings(cfg: DictConfig, loss_class, scheme, offered_by: list[str]) -> None:
    """At composition: what int8 students (student.quantize=int8) cannot run with, one
    line each; ``offered_by``: the schemes that declare int8 rows (``int8_students``)."""
    why = None
    if not scheme.int8_students:
        why = (f"its int8 rows come with {' or '.join(f'scheme={n}' for n in offered_by)}, "
               f"not scheme={cfg.scheme.name}")
    elif on_gpu(cfg.device):
        why = "int8 kernels run on the CPU: set device=cpu"
    elif cfg.trainer.get("float64"):
        why = "quantisation-aware training fake-quantises float32: set trainer.float64=false"
    elif loss_class.reads_features:
        why = (f"loss={cfg.loss.name} reads a layer of the student, whose graph quantisation "
               f"rewrites; use a loss on the logits")
    if why:
        raise ConfigError("student.quantize", "int8", why)


def check_converts(cfg: DictConfig, data: Data) -> torch.nn.Module | None:
    """After the data is loaded, before anything trains: the student converts to int8
    (student.quantize=int8), with at least one layer on int8 kernels; else one line saying
    why. Returns that int8 model (to time: latency depends on the architecture, not on the
    weights), or None."""
    if not wanted(cfg):
        return None
    try:
        with torch.random.fork_rng(devices=[]):  # a probe: the stages' draws stay theirs
            int8 = int8_like(build_model(cfg.student, data.input_shape, data.num_classes), data)
    except ConfigError:
        raise
    except Exception as e:  # what torch.fx or the quantiser says of a layer
        raise ConfigError("student.quantize", "int8", f"student={describe(cfg.student)} does not "
                          f"quantise: {one_line_reason(e)}") from e
    if not int8_weights(int8):
        raise ConfigError("student.quantize", "int8", f"student={describe(cfg.student)} has no "
                          "linear layer or convolution that runs on int8 kernels")
    return int8


def int8_like(student: torch.nn.Module, data: Data) -> torch.nn.Module:
    """An int8 model of the student's architecture, to time (latency depends on the
    architecture, not on the weights): fake-quantised, run once, converted."""
    fake = fake_quantized(student, data.input_shape)
    with torch.no_grad():
        fake(example_inputs(fake, 8, data.input_shape))
    return to_int8(fake)


def one_line_reason(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
