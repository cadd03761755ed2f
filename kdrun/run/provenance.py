"""What decides a result: the settings in a stage's cache key, the settings kept out
of it (those that cannot change any number, and those that change only the order of
floating-point operations), and the arithmetic a stage really ran with.

The reuse rule: a stage key holds what defines the computation up to floating-point
rounding: data content, split and label budget, the model and its weights' identity,
the loss, optimiser, schedule, epochs and seeds, the teacher's key and targets, the
precision as resolved (fp64 / fp32 / tf32 / bf16 autocast), the device type and the
torch version. What only reorders the arithmetic (``ROUNDING_ONLY``: threads, the
processor, trained alone or stacked, fused kernels, evaluation chunks...) is recorded
in every summary row, not keyed: bit-identity across those is impossible anyway
(another CPU gives other bits), so keying on them buys no truth and costs reuse.
``tests/test_provenance.py`` flips every entry of ``NO_EFFECT`` (bit-identical
weights) and of ``ROUNDING_ONLY`` (the same key; in float64, weights within a stated
bound).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from kdrun import distributed
from kdrun.data.metrics import ACCURACY, Metric
from kdrun.precision import resolved_precision
from kdrun.train.optim import uses_fused

# Settings that cannot change a trained weight or an accuracy: left out of stage keys,
# of a run's config hash and of sweep job folder names, and never a "setting" in a
# sweep report. Dotted paths (a path covers what lies under it); each line says why.
# tests/test_provenance.py flips each one and compares the weights bit for bit.
NO_EFFECT: dict[str, str] = {
    "progress": "draws a progress bar",
    "logger": "adds TensorBoard files or MLflow records beside the CSV files",
    "output_root": "where the run directories go",
    "cache.enabled": "whether stages are kept for reuse",
    "cache.dir": "where stages are kept",
    "export": "writes an ONNX copy after training",
    "latency.repeats_b1": "how compression figures are timed, afresh at every report",
    "latency.repeats_b256": "how compression figures are timed, afresh at every report",
    "latency.warmup": "how compression figures are timed, afresh at every report",
    "hparams_search": "picks the sweeper; each trial's values are its own overrides",
    "trainer.checkpoint_every": "how often the resumable state is saved; a resume is exact",
    "distributed.timeout_min": "how long a process waits for the others before failing",
    "slurm.vanished_after_s": "how long a sweep waits for a Slurm job that left the queue",
    "search.objectives": "what a job returns to the sweeper",
    "search.tolerance": "what a student search's report marks",
}
# Settings that change only the order in which floating-point operations run: the same
# computation up to rounding. Left out of stage keys (a stage trained under one value is
# reused under another) and of a sweep report's settings (jobs differing only in them
# are pooled, and the report says so); recorded in every summary row under the column
# named here. The first three are no config keys: the machine, the batched launcher, and
# the number of processes that torchrun or Slurm starts.
# tests/test_provenance.py and tests/test_batched.py flip each one in float64.
ROUNDING_ONLY: dict[str, tuple[str, str]] = {
    "processor": ("processor", "another CPU or GPU model: other vector widths and kernels"),
    "hydra/launcher": ("trained_in", "alone or in a stacked group (hydra/launcher=batched): "
                                     "the stacked matrix products sum in another order"),
    "processes": ("processes", "the global batch split among processes (torchrun, Slurm "
                               "tasks), its gradients summed across them; a stage whose maths "
                               "the shards change keys their number (kdrun/train/shards.py)"),
    "distributed.backend": ("backend", "gloo or NCCL sums the processes' gradients in its "
                                       "own order"),
    "num_threads": ("threads", "CPU threads split each reduction into other partial sums"),
    "one_thread_below_mflop": ("threads", "decides how many threads num_threads=auto gives"),
    "trainer.fused_optimizer": ("fused_optimizer", "one fused kernel or a loop per tensor: "
                                                   "the same elementwise update"),
    "trainer.eval_batch_size": ("eval_batch_size", "evaluation and the teacher's logits in "
                                                   "other chunks: per example the same maths"),
    "trainer.loss_chunk_rows": ("loss_chunk_rows", "the loss's per-row terms summed chunk by "
                                                   "chunk: the same terms in another order"),
    "trainer.compile": ("compile", "torch.compile fuses the same operations into other kernels"),
    "trainer.cudnn_benchmark": ("cudnn_benchmark", "cuDNN picks among algorithms for the same "
                                                   "convolution (CUDA only)"),
    "trainer.channels_last": ("channels_last", "another memory layout of the same convolution "
                                               "(CUDA only)"),
}
# Where a data set's files are (or a generated set is kept), and whether to fetch them:
# a stage key holds the content of the data instead (kdrun/data/base.py: fingerprint), so
# these stay out of it.
DATA_LOCATION = ("root", "download", "cache_dir")
# Keys whose values are replicates of one setting: a sweep report pools over them.
REPLICATE_KEYS = ("seed",)
# The settings of a run that name its folder in a sweep but are Hydra's, not the run's.
HYDRA_ONLY = ("hydra",)


def hydra_exclude_keys() -> list[str]:
    """Hydra's ``override_dirname.exclude_keys``: sweep job folders are not named by them."""
    return list(NO_EFFECT)


OmegaConf.register_new_resolver("kdrun_no_effect_keys", hydra_exclude_keys, replace=True)


def is_no_effect(dotted: str) -> bool:
    """``logger.dir`` is covered by ``logger``; ``trainer.lr`` by nothing."""
    parts = dotted.lstrip("+~").split(".")
    return any(".".join(parts[:i]) in NO_EFFECT for i in range(1, len(parts) + 1))


def is_rounding_only(dotted: str) -> bool:
    """``num_threads`` and ``trainer.fused_optimizer`` are; ``trainer.lr`` is not."""
    return dotted.lstrip("+~") in ROUNDING_ONLY


def outside_the_key(dotted: str) -> bool:
    """A setting a stage key and a report's setting leave out: no effect, or rounding only."""
    return is_no_effect(dotted) or is_rounding_only(dotted)


def without_unkeyed(settings: dict, prefix: str = "") -> dict:
    """A resolved config (or one of its groups, under ``prefix``) less every key outside
    the key (NO_EFFECT and ROUNDING_ONLY)."""
    kept = {}
    for key, value in settings.items():
        dotted = f"{prefix}{key}"
        if outside_the_key(dotted) or dotted in HYDRA_ONLY:
            continue
        kept[key] = without_unkeyed(value, f"{dotted}.") if isinstance(value, dict) else value
    return kept


def digest(material) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]


def config_hash(cfg: DictConfig) -> str:
    """The run's settings that define its computation (a finished run directory
    refuses a config whose hash differs)."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    settings["student"] = model_key(settings["student"])
    settings["trainer"] = trainer_key(settings["trainer"])
    return digest(without_unkeyed(settings))


# Trainer keys added after stages were first keyed, at the value that leaves the maths
# as it was: left out of keys and hashes there, so that existing stages and finished runs
# keep theirs.
NEUTRAL_TRAINER = {"schedule_unit": "epoch", "warmup_steps": 0, "min_lr": 0.0,
                   "accumulate": 1, "betas": [0.9, 0.999]}


def trainer_key(trainer: dict) -> dict:
    return {k: v for k, v in trainer.items()
            if not (k in NEUTRAL_TRAINER and v == NEUTRAL_TRAINER[k])}


def model_key(model: dict) -> dict:
    """A model's settings as keys and hashes hold them: ``quantize`` unset (null, a
    float32 model) is left out, so that adding it left existing keys as they were."""
    return {k: model_key(v) if isinstance(v, dict) else v for k, v in model.items()
            if not (k == "quantize" and v is None)}  # and a cohort's member's


# ---------------------------------------------------------------- numerics


def numerics(tcfg, device: torch.device) -> dict:
    """What a stage key holds of the arithmetic: the device type, the precision as
    resolved on it (switches that do nothing there, such as bf16 autocast on a CPU,
    resolved away, so flipping them does not split the cache) and the torch version."""
    return {"device_type": device.type, "precision": resolved_precision(tcfg, device),
            "torch": torch.__version__}


def numerics_columns(record: dict) -> dict:
    """What the summary records of a stage's numerics: device, precision, torch."""
    return {"device": record["device_type"], "precision": record["precision"],
            "torch": record["torch"]}


def arithmetic_order(tcfg, device: torch.device) -> dict:
    """The ROUNDING_ONLY settings a stage runs with, under their summary columns (all
    but ``trained_in``, which the stage adds): recorded, never keyed. Switches that do
    nothing on ``device`` are recorded as off."""
    cuda = device.type == "cuda"
    return {
        "threads": torch.get_num_threads(),
        "processes": distributed.world().size,
        "backend": distributed.backend() or "none",
        "processor": processor_name(device),
        "fused_optimizer": uses_fused(tcfg, device),
        "eval_batch_size": int(tcfg.eval_batch_size),
        "loss_chunk_rows": int(tcfg.get("loss_chunk_rows") or 0),  # 0: the batch at once
        "compile": bool(tcfg.compile),
        "cudnn_benchmark": cuda and bool(tcfg.cudnn_benchmark),
        "channels_last": cuda and bool(tcfg.channels_last),
    }


def rounding_columns() -> list[str]:
    """The summary columns that record ROUNDING_ONLY settings."""
    return [column for column, _ in ROUNDING_ONLY.values()]


def processor_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU's model name (Linux), else its architecture."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


@functools.cache
def _cpu_name() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


# Trainer keys a stage's key holds in resolved form instead: the epochs it really
# trains, the precision above, and (distilled stages only) the teacher weights and
# targets it learns from (the memory plan's choice of the full or top-k cache included).
RESOLVED_PER_STAGE = ("epochs", "teacher_epochs", "student_epochs", "distill_from",
                      "cache_teacher_logits", "cache_teacher_features_mb", "amp", "tf32",
                      "float64", "teacher_topk", "teacher_cache", "auto_topk",
                      "memory_share")


def stage_material(cfg: DictConfig, *, role: str, model_cfg, seed: int, epochs: int,
                   numerics: dict, data_digest: str, adds: dict | None = None) -> dict:
    """Exactly the settings that decide a trained stage's numbers: its cache key.
    ``adds``: what the stage's key holds besides the run's settings (its loss, its
    teacher, a transfer set: kdrun/run/stages.py)."""
    from kdrun.models import model_identity

    trainer = trainer_key(without_unkeyed(_plain(cfg.trainer), "trainer."))
    identity = model_identity(model_cfg)  # e.g. the hash of the pretrained weights it starts from
    return {
        "stage": role, "data": data_digest, "dataset": _dataset(cfg),
        "split": _plain(cfg.split), "model": model_key(_plain(model_cfg)),
        "trainer": {k: v for k, v in trainer.items() if k not in RESOLVED_PER_STAGE},
        "numerics": numerics, "epochs": epochs, "seed": seed, **(adds or {}),
        **({"model_identity": identity} if identity else {}),
    }


def loss_key(loss_cfg: dict) -> dict:
    """A loss's settings as a stage key holds them: a key set to null is unset (e.g. the
    term weights ce_weight and kd_weight where alpha weights the terms), as if absent,
    so adding an optional key to a loss leaves the keys of existing stages as they were."""
    return {k: v for k, v in loss_cfg.items() if v is not None}


def given_teacher_material(cfg: DictConfig, model_cfg, file_sha256: str, weights: str,
                           numerics: dict, data_digest: str) -> dict:
    """The key of a user's teacher checkpoint: the file's content, the architecture that
    loads it, the weights taken from it, and what its logits are computed on and with."""
    model = {k: v for k, v in _plain(model_cfg).items() if k != "checkpoint"}
    return {"stage": "teacher", "checkpoint_sha256": file_sha256, "weights": weights,
            "model": model, "data": data_digest, "dataset": _dataset(cfg),
            "split": _plain(cfg.split), "numerics": numerics}


def seed_stream(name: str, seed: int) -> int:
    """A torch seed for ``name`` (e.g. "teacher") and ``seed`` that no student seed
    (a small integer) takes: a teacher never shares init, batch order or dropout
    masks with a student it teaches."""
    return int.from_bytes(hashlib.sha256(f"{name}:{seed}".encode()).digest()[:7], "big")


def _dataset(cfg: DictConfig) -> dict:
    """The data set's settings, less where it lives, and less ``unlabeled``: the extra
    unlabelled examples change only the stages that train on them, whose keys hold the
    transfer set's content hash instead (kdrun/run/stages.py)."""
    return {k: v for k, v in _plain(cfg.dataset).items()
            if k not in DATA_LOCATION and k != "unlabeled"}


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def run_keys(cfg: DictConfig, loss: dict, metric: Metric = ACCURACY) -> dict:
    """The settings that tell runs of a sweep apart, added to every CSV row; ``loss`` is
    the one the distilled student trains with (its scheme's ``distillation_loss``),
    ``metric`` what the ``acc`` columns hold (the data set's, kdrun/data/metrics.py)."""
    return {"dataset": cfg.dataset.name, "method": loss["name"],
            "T": loss.get("T"), "alpha": loss.get("alpha"), "metric": metric.name,
            "higher_is_better": metric.higher_is_better}


def student_seeds(cfg: DictConfig) -> list[int]:
    """seed*repeats, ..., seed*repeats + repeats-1: a sweep over ``seed=0,1,2`` gets
    disjoint student seeds, so no two teachers share (and correlate) a scratch student."""
    return [cfg.seed * cfg.repeats + i for i in range(cfg.repeats)]
