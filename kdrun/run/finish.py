"""A trained stage's files: its checkpoint and its summary (the columns of its row),
written into its cache entry once it has trained, alone or in a stacked group."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from kdrun.data import Data
from kdrun.data.labels import UNLABELED
from kdrun.models import describe
from kdrun.report.measure import model_figures
from kdrun.run.summary_row import RowContext
from kdrun.store.cache import StageEntry


def finish_stage(entry: StageEntry, model, loss, result, *, role: str, seed: int, train_seed: int,
                 model_cfg, data: Data, cfg: DictConfig, context: RowContext,
                 trained_in: str, figures: dict | None = None) -> None:
    """Write a trained stage's checkpoint and summary into its cache entry.
    ``trained_in`` says how: alone, or in a batch of students trained as one; ``figures``
    (params, size_mb) replace the model's own (an int8 model's size)."""
    checkpoint = trained_checkpoint(model, loss, result, model_cfg, data, cfg)
    entry.finish(checkpoint={**checkpoint, "role": role, "seed": seed, "rng_seed": train_seed},
                 summary={"role": role, "arch": describe(model_cfg),
                          **(figures or model_figures(getattr(model, "deployed", model))),
                          **_result_columns(result), **examples_seen(data),
                          **token_speed(data, result),
                          "eval_split": context.eval_split,
                          "selected_by": "last epoch (data-free)" if result.generated
                          else context.selected_by,
                          **context.provenance, "trained_in": trained_in})


def examples_seen(data: Data) -> dict:
    """How many labelled and unlabelled training examples a stage trained on, and how
    many validation examples selected its epoch."""
    no_label = data.train.y == UNLABELED  # text: one per position, (examples, positions)
    no_label = no_label.unsqueeze(1) if no_label.ndim == 1 else no_label
    unlabeled = int(no_label.all(1).sum())
    return {"train_labeled": len(data.train) - unlabeled, "train_unlabeled": unlabeled,
            "val_examples": len(data.val) if data.eval_split != "train" else 0}


def token_speed(data: Data, result) -> dict:
    """A language model's stage: the positions it predicts per epoch (every one is a
    token trained on) and the tokens per second of its training epochs."""
    if not data.per_position:
        return {}
    tokens = data.train.y.numel()
    rate = tokens * result.epochs / result.train_seconds if result.train_seconds else None
    return {"train_tokens": tokens, "train_tokens_per_s": rate and round(rate)}


def trained_checkpoint(model, loss, result, model_cfg, data: Data, cfg: DictConfig) -> dict:
    """A finished stage's checkpoint: last and best-val weights of the model and of the
    model it deploys (a cohort ships its first member), optimiser state, the config."""
    deployed = getattr(model, "deployed", model)
    prefix = next(name for name, m in model.named_modules() if m is deployed)
    best_deployed = {k.removeprefix(f"{prefix}.") if prefix else k: v
                     for k, v in result.best_state.items()
                     if not prefix or k.startswith(f"{prefix}.")}
    return {"arch": OmegaConf.to_container(model_cfg, resolve=True),
            "input_shape": list(data.input_shape), "num_classes": data.num_classes,
            "model": model.state_dict(), "best_model": result.best_state,
            "deployed": deployed.state_dict(), "deployed_best": best_deployed,
            "loss_state": loss.state_dict(), "epoch": result.epochs,
            "best_epoch": result.best_epoch, "optimizer": result.optimizer_state,
            "config": OmegaConf.to_container(cfg, resolve=True)}


def _result_columns(result) -> dict:
    generated = {} if result.generated is None else {"train_generated": result.generated}
    return {"epochs": result.epochs, "best_epoch": result.best_epoch,
            "val_metric_best": result.val_metric_best, "test_metric_last": result.test_metric_last,
            "test_metric_best_val": result.test_metric_best_val,
            "train_seconds": round(result.train_seconds, 3), **generated}
