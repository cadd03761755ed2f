"""What decides a result: the settings in a stage's cache key, the one list of settings
that cannot change any trained number, and the numerics a stage really ran with.

A stage is reused only when a fresh computation would give the same numbers, so its
key holds everything else: data content, split, model, loss, the trainer's settings,
the numerics below (device type, precision, fused or not, threads...) and the torch
version. ``tests/test_provenance.py`` flips every entry of ``NO_EFFECT`` and checks
that the stage is reused *and* that a fresh computation gives bit-identical weights.
"""

from __future__ import annotations

import hashlib
import json

import torch
from omegaconf import DictConfig, OmegaConf

from kdrun.train import fused_kernel_exists

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
}
# Where a data set's files are (or a generated set is kept), and whether to fetch them:
# a stage key holds the content of the data instead (kdrun/data.py: fingerprint), so
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


def without_no_effect(settings: dict, prefix: str = "") -> dict:
    """A resolved config (or one of its groups, under ``prefix``) less every NO_EFFECT key."""
    kept = {}
    for key, value in settings.items():
        dotted = f"{prefix}{key}"
        if is_no_effect(dotted) or dotted in HYDRA_ONLY:
            continue
        kept[key] = without_no_effect(value, f"{dotted}.") if isinstance(value, dict) else value
    return kept


def digest(material) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]


def config_hash(cfg: DictConfig) -> str:
    """The run's settings that can change its numbers (a finished run directory
    refuses a config whose hash differs)."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    return digest(without_no_effect(settings))


# ---------------------------------------------------------------- numerics


def numerics(tcfg, device: torch.device) -> dict:
    """The arithmetic a stage really runs with on ``device``: switches that do nothing
    there (bf16 autocast, TF32, cuDNN autotuning and channels-last on a CPU) are
    resolved away, so flipping them does not split the cache, while the ones that act
    are recorded, with the CPU threads (their count changes reduction order) and the
    torch version."""
    cuda = device.type == "cuda"
    record = {
        "device_type": device.type,
        "precision": "bf16-autocast" if cuda and tcfg.amp else "fp32",
        "fused_optimizer": bool(tcfg.fused_optimizer)
        and fused_kernel_exists(tcfg.optimizer, device.type),
        "compile": bool(tcfg.compile),
        "torch": torch.__version__,
    }
    if cuda:
        record.update(tf32=bool(tcfg.tf32), cudnn_benchmark=bool(tcfg.cudnn_benchmark),
                      channels_last=bool(tcfg.channels_last))
    else:
        record["cpu_threads"] = torch.get_num_threads()
    return record


def numerics_columns(record: dict) -> dict:
    """What the summary records of a stage's numerics: device, precision, torch."""
    return {"device": record["device_type"], "precision": record["precision"],
            "torch": record["torch"]}


# Trainer keys a stage's key holds in resolved form instead: the epochs it really
# trains, the numerics above, and (distilled stages only) the teacher weights and
# targets it learns from.
RESOLVED_PER_STAGE = ("epochs", "teacher_epochs", "student_epochs", "distill_from",
                      "cache_teacher_logits", "amp", "tf32", "cudnn_benchmark",
                      "fused_optimizer", "channels_last", "compile")


def stage_material(cfg: DictConfig, *, role: str, model_cfg, seed: int, epochs: int,
                   numerics: dict, data_digest: str, extra: dict | None = None) -> dict:
    """Exactly the settings that decide a trained stage's numbers: its cache key."""
    from kdrun.models import model_identity

    trainer = without_no_effect(_plain(cfg.trainer), "trainer.")
    identity = model_identity(model_cfg)  # e.g. the hash of the pretrained weights it starts from
    return {
        "stage": role, "data": data_digest, "dataset": _dataset(cfg),
        "split": _plain(cfg.split), "model": _plain(model_cfg),
        "trainer": {k: v for k, v in trainer.items() if k not in RESOLVED_PER_STAGE},
        "numerics": numerics, "epochs": epochs, "seed": seed, **(extra or {}),
        **({"model_identity": identity} if identity else {}),
    }


def given_teacher_material(cfg: DictConfig, model_cfg, file_sha256: str, weights: str,
                           numerics: dict, data_digest: str) -> dict:
    """The key of a user's teacher checkpoint: the file's content, the architecture that
    loads it, the weights taken from it, and what its logits are computed on and with."""
    model = {k: v for k, v in _plain(model_cfg).items() if k != "checkpoint"}
    return {"stage": "teacher", "checkpoint_sha256": file_sha256, "weights": weights,
            "model": model, "data": data_digest, "dataset": _dataset(cfg),
            "split": _plain(cfg.split), "eval_batch_size": cfg.trainer.eval_batch_size,
            "numerics": numerics}


def seed_stream(name: str, seed: int) -> int:
    """A torch seed for ``name`` (e.g. "teacher") and ``seed`` that no student seed
    (a small integer) takes: a teacher never shares init, batch order or dropout
    masks with a student it teaches."""
    return int.from_bytes(hashlib.sha256(f"{name}:{seed}".encode()).digest()[:7], "big")


def _dataset(cfg: DictConfig) -> dict:
    """The data set's settings, less where it lives, and less ``unlabeled``: the extra
    unlabelled examples change only the stages that train on them, whose keys hold the
    transfer set's content hash instead (kdrun/stages.py)."""
    return {k: v for k, v in _plain(cfg.dataset).items()
            if k not in DATA_LOCATION and k != "unlabeled"}


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def distillation_loss(cfg: DictConfig) -> dict:
    """The loss the distilled student is trained with: the loss group's, except in deep
    mutual learning, whose cohort loss is the scheme's own."""
    if cfg.scheme.name == "dml":
        return {"name": "dml", "T": cfg.scheme.T}
    return OmegaConf.to_container(cfg.loss, resolve=True)


def run_keys(cfg: DictConfig) -> dict:
    """The settings that tell runs of a sweep apart, added to every CSV row."""
    loss = distillation_loss(cfg)
    return {"dataset": cfg.dataset.name, "method": loss["name"],
            "T": loss.get("T"), "alpha": loss.get("alpha")}


def student_seeds(cfg: DictConfig) -> list[int]:
    """seed*repeats, ..., seed*repeats + repeats-1: a sweep over ``seed=0,1,2`` gets
    disjoint student seeds, so no two teachers share (and correlate) a scratch student."""
    return [cfg.seed * cfg.repeats + i for i in range(cfg.repeats)]
