"""One run: load the data, let the scheme (kdrun/run/schemes/base.py) run its stages (train the
teacher, train the student from scratch, distill the student; kdrun/run/stages.py), time
teacher and student side by side, write the summary and print the comparison. The
pipeline never knows which loss it runs.
"""

from __future__ import annotations

import logging
import os
import re
import statistics

import pandas as pd
import torch
from omegaconf import DictConfig

from kdrun import distributed
from kdrun.data import Data, load_data
from kdrun.errors import ConfigError, OutOfMemory, UserError
from kdrun.models import (
    build_model,
    describe,
    forward_mflop,
    input_spec,
)
from kdrun.models.hubs.pretrained import InputSpec
from kdrun.report.export import export_distilled, export_int8
from kdrun.report.measure import side_by_side
from kdrun.report.table import comparison_table, one_line, write_summary
from kdrun.run import data_checks
from kdrun.run.memory_plan import plan_memory
from kdrun.run.objective import objective
from kdrun.run.provenance import config_hash, student_seeds
from kdrun.run.schemes import scheme_of
from kdrun.run.stages import Stages
from kdrun.run.summary_row import SummaryRow
from kdrun.store.columns import current_columns
from kdrun.store.faults import storage_fault
from kdrun.store.files import RunDir, remove_temporaries

log = logging.getLogger("kdrun")


def pick_device(name: str) -> torch.device:
    """The device named; with several processes on a machine, ``cuda`` and ``auto`` give
    each process its own GPU (its local rank)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", name, "CUDA is not available on this machine; use cpu or auto")
    world = distributed.world()
    if name == "cuda" and world.parallel:
        name = f"cuda:{world.local_rank}"
        torch.cuda.set_device(name)
    return torch.device(name)


def run(cfg: DictConfig, out_dir: str | os.PathLike) -> dict:
    """Run the whole pipeline into ``out_dir``; return the summary rows and the table.
    A run directory that already holds this finished run is not run again. A full disk,
    a vanished file or exhausted memory, wherever met, is one line (a UserError)."""
    try:
        return _run(cfg, out_dir)
    except Exception as e:
        fault = storage_fault(e)  # a file a library wrote or read, or one that vanished
        if fault is None and is_out_of_memory(e):  # outside the stages: no plan to cite
            fault = OutOfMemory(out_of_memory_line(e, pick_device(cfg.device)))
        if fault is None:
            raise
        raise fault from e


def _run(cfg: DictConfig, out_dir: str | os.PathLike) -> dict:
    run_dir = RunDir(out_dir)
    writer = distributed.world().writer
    finished = _finished_run(cfg, run_dir) if writer else None
    if distributed.from_writer(finished is not None):
        return finished or FOLLOWER_RESULT
    for folder in (run_dir.root, run_dir.checkpoints):
        remove_temporaries(folder)  # left by a run killed mid-write
    device, data = prepare(cfg)
    goal = objective(cfg, data)
    log.info("%s", goal.line)
    log.info("data: %s, %d train / %d val / %d %s examples, input %s, %d classes",
             data.name, len(data.train), len(data.val), len(data.test), data.eval_split,
             data.input_shape, data.num_classes)
    report_inputs(cfg, data)
    if data.paired:
        log.info("%s", views_line(cfg, data))
    elif data.teacher_data is not None:
        log.info("teacher tokenizer: %s, windows of %d (the students': %s, %d); the teacher's "
                 "perplexity is per token of its own, not comparable with the students'",
                 cfg.dataset.teacher_tokenizer, data.teacher_data.input_shape[0],
                 cfg.dataset.tokenizer, data.input_shape[0])
    int8 = data_checks.check(cfg, data)  # with int8 students: one to time after training
    plan = plan_memory(cfg, data, device)
    log.info("%s", plan.line)
    stages = Stages(cfg, data, device, run_dir, teacher_topk=plan.teacher_topk)

    try:
        rows = scheme_of(cfg).run(stages, cfg)
    except KeyboardInterrupt:
        stages.metrics.interrupt()
        raise
    except Exception as e:
        stages.metrics.fail()
        if is_out_of_memory(e):  # one line, not a traceback; the stages before it are kept
            raise OutOfMemory(out_of_memory_line(e, device, plan)) from e
        raise
    stages.metrics.close()
    if not writer:  # rank 0 times the models, writes the summary and reports
        distributed.barrier()
        return FOLLOWER_RESULT
    rows = goal.on_rows(_with_figures(rows, stages.teacher_model, cfg, data, device, int8))
    rows = [row.with_columns(**plan.columns(), **view_column(cfg, data, row.role))
            for row in rows]
    summary = write_summary(run_dir.summary_csv, [row.columns() for row in rows])
    result = _report(cfg, data.name, data.eval_split, run_dir, summary)
    stages.metrics.finish(run_dir, summary, result["table"])
    if cfg.export == "onnx":  # after the summary: a model that cannot be exported loses nothing
        export_distilled(cfg, data, run_dir, stages.student_seeds[0])
        if stages.int8:
            export_int8(cfg, data, run_dir, stages.student_seeds[0])
    run_dir.mark_done({"config_hash": config_hash(cfg),
                       "distilled_val_metric": result["distilled_val_metric"]})
    distributed.barrier()
    return result


def view_column(cfg: DictConfig, data: Data, role: str) -> dict:
    """Paired views: the view a row's model read (the table names it)."""
    if not data.paired:
        return {}
    return {"view": cfg.dataset.teacher_view if role == "teacher" else cfg.dataset.student_view}


def views_line(cfg: DictConfig, data: Data) -> str:
    """What each model reads of paired views, and what the students distil on."""
    graph = data.graph or data.teacher_data.graph
    setting = cfg.dataset.get("setting")
    on_graph = "" if graph is None else (
        f" of a graph of {graph.num_nodes} nodes and {graph.edges.shape[1] // 2} edges "
        f"({setting})")
    among = (" (transductive: the validation and test nodes among them, without labels)"
             if graph is not None and setting == "transductive" else "")
    return (f"views: the teacher reads {cfg.dataset.teacher_view} "
            f"{data.teacher_input_shape or '(node ids)'}{on_graph}, the students read "
            f"{cfg.dataset.student_view} {data.input_shape or '(node ids)'}; the distilled "
            f"student learns the teacher's outputs on its {len(data.train)} labelled and "
            f"{data.unlabeled_count} unlabelled examples{among}")


def is_out_of_memory(error: Exception) -> bool:
    """A failed allocation: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def out_of_memory_line(error: Exception, device, plan=None) -> str:
    """What ran out, how much was asked for (where the allocator said), the memory plan's
    figures (when there is one), and the knobs."""
    asked = re.search(r"allocate (\d+) bytes|Tried to allocate ([\d.]+ [KMG]iB)", str(error))
    size = "" if asked is None else (f" asking for {int(asked[1]) / 1e9:.2f} GB" if asked[1]
                                     else f" asking for {asked[2]}")
    planned = "" if plan is None else (f" (the plan said about {plan.peak / 1e9:.2f} GB, "
                                       f"with {plan.available / 1e9:.2f} GB free)")
    return (f"out of memory on {device}{size}{planned}; finished stages are kept in the stage "
            f"cache: lower trainer.batch_size or trainer.eval_batch_size, set "
            f"trainer.loss_chunk_rows or trainer.teacher_topk, and run the same command again")


# What a process other than rank 0 returns: rank 0's result is the run's.
FOLLOWER_RESULT = {"rows": [], "table": "", "line": "", "distilled_val_metric": float("nan")}


def prepare(cfg: DictConfig) -> tuple[torch.device, Data]:
    """The run's device, its data, and its CPU thread count (recorded in every row)."""
    device = pick_device(cfg.device)
    set_threads(cfg)
    spec = model_input_spec(cfg) if cfg.dataset.get("normalize") == "model" else None
    writer = distributed.world().writer
    if not writer:
        distributed.barrier()  # after rank 0, which writes what a generated set keeps on disk
    data = load_data(cfg.dataset, cfg.split, spec and (spec.mean, spec.std))
    if writer:
        distributed.barrier()
    set_threads(cfg, data, device)
    return device, data


TORCH_THREADS = torch.get_num_threads()  # torch's default: one per core


def set_threads(cfg: DictConfig, data: Data | None = None,
                device: torch.device | None = None) -> None:
    """``num_threads`` CPU threads for torch, at most the cores. null: torch's default;
    auto: one thread on a CPU where the models are small (``small_models``), else
    torch's default, decided once the data (the models' input) is known; the data is
    loaded on one thread, so that auto is exactly num_threads=1 for small models."""
    threads = cfg.num_threads
    if threads == "auto":
        threads = 1 if data is None or (device.type == "cpu" and small_models(cfg, data)) \
            else None
    threads = min(threads, os.cpu_count() or 1) if threads else TORCH_THREADS
    processes = distributed.world().local_size  # on this machine: they share its cores
    torch.set_num_threads(min(threads, max(1, (os.cpu_count() or 1) // processes))
                          if processes > 1 else threads)


def small_models(cfg: DictConfig, data: Data) -> bool:
    """Whether the teacher's and the student's forward pass on a training batch each
    cost under ``one_thread_below_mflop``: ops that small gain little from more threads
    on an idle machine and lose several times over when another process shares the
    cores (benchmarks/bench_threads.py). A model whose cost cannot be counted without
    building it for real (pretrained weights, a language model) counts as large."""
    shapes = {"teacher": data.teacher_input_shape, "student": data.input_shape}
    costs = [forward_mflop(cfg[role], shapes[role], data.num_classes,
                           cfg.trainer.batch_size) for role in ("teacher", "student")]
    return all(cost is not None and cost < cfg.one_thread_below_mflop for cost in costs)


def model_input_spec(cfg: DictConfig) -> InputSpec:
    """``dataset.normalize=model``: the input statistics of the teacher's weights, else
    of the student's (models of timm or torchvision)."""
    for role in ("teacher", "student"):
        spec = input_spec(cfg[role])
        if spec is not None:
            return spec
    raise ConfigError("dataset.normalize", "model", "neither teacher nor student is a timm or "
                      "torchvision model with known input statistics; use data")


def report_inputs(cfg: DictConfig, data: Data) -> None:
    """Say what input a pretrained model expects and what it gets: a resize or a
    normalisation is the user's choice, never silent."""
    how = {"model": "the model's mean and std", "data": "its own training statistics"}
    scaled = (how[cfg.dataset.get("normalize") or "data"] if cfg.split.standardize
              else "not normalised")
    for role in ("teacher", "student"):
        spec = input_spec(cfg[role]) if cfg[role].get("pretrained") else None
        if spec is not None:
            log.info("%s %s: %s; this data: %s, normalised by %s (dataset.resize, "
                     "dataset.normalize=model change that)", role, describe(cfg[role]),
                     spec.describe(), "x".join(map(str, data.input_shape)), scaled)


def _with_figures(rows: list[SummaryRow], teacher, cfg, data: Data, device,
                  int8: torch.nn.Module | None = None) -> list[SummaryRow]:
    """The rows with latency, speed-up and compression: teacher and student (and its
    ``int8`` model) timed now, side by side, in this process."""
    student = build_model(cfg.student, data.input_shape, data.num_classes, graph=data.graph)
    timing = side_by_side(teacher, student, data.input_shape, device, cfg.latency, int8,
                          teacher_shape=data.teacher_input_shape)
    teacher_params = next((row.params for row in rows if row.role == "teacher"), None)
    return [row.with_figures(timing, teacher_params) for row in rows]


def _report(cfg, dataset_name, eval_split, run_dir: RunDir, summary: pd.DataFrame) -> dict:
    scheme, header = scheme_of(cfg), _header(cfg, dataset_name, eval_split)
    table, line = scheme.report(summary, header, run_dir) or (
        comparison_table(summary, header=header, teacher=scheme.verdict_scope(cfg),
                         draw=_label_draw(cfg)), one_line(summary))
    log.info("\n%s\nfiles: %s (metrics.csv, summary.csv, checkpoints/)", table, run_dir.root)
    selected_val = summary[summary.role == scheme.selected_role(cfg)].val_metric_best
    return {"rows": summary.to_dict("records"), "table": table, "line": line,
            "distilled_val_metric": float(statistics.mean(selected_val))}


def _label_draw(cfg: DictConfig) -> str | None:
    """With a label budget, which labelled examples the run drew: the verdict holds for
    that draw too (on real MNIST with 1,000 labels the gain moved from -1.4 to +2.2
    points with the teacher and the draw)."""
    if cfg.split.get("labeled") is None:
        return None
    return f"one draw of the labelled examples (split.seed={cfg.split.seed})"


def _finished_run(cfg: DictConfig, run_dir: RunDir) -> dict | None:
    """The stored result when ``run_dir`` already holds this run, finished."""
    done = run_dir.done()
    if done is None:
        return None
    if done["config_hash"] != config_hash(cfg):
        raise UserError(f"{run_dir.root} already holds a finished run of another config; "
                        f"choose a new output directory")
    log.info("%s: this run already finished, nothing to do", run_dir.root)
    summary = current_columns(pd.read_csv(run_dir.summary_csv))
    result = _report(cfg, cfg.dataset.name, summary.eval_split.iloc[0], run_dir, summary)
    return {**result, "line": f"this run already finished: {result['line']}"}


def _header(cfg: DictConfig, dataset_name: str, eval_split: str) -> str:
    scheme = scheme_of(cfg)
    loss = " ".join(f"{k}={v}" for k, v in scheme.distillation_loss(cfg).items()
                    if v is not None)  # an unset term weight says nothing
    seeds = ",".join(map(str, student_seeds(cfg)))
    text = f"kdrun | dataset={dataset_name} | loss: {loss} | student seeds {seeds}"
    if scheme.shown:
        scheme = " ".join(f"{k}={v}" for k, v in cfg.scheme.items())
        text += f" | scheme: {scheme}"
    if eval_split == "train":
        text += ("\naccuracies are on the TRAINING data: the labels are random, so they "
                 "measure memorisation, not generalisation")
    return text
