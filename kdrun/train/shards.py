"""When one stage's global batch is split among several processes (kdrun/distributed.py),
is it still the same computation? Each shard's mean loss, weighted by its share of the
batch and summed over the processes, equals the loss of the whole batch when the loss is
a mean of per-row terms. It is not, beyond rounding, when the shards change what a row
sees: the stage key then holds the number of processes (kdrun/run/stage.py)."""

from __future__ import annotations

from torch import nn

from kdrun import distributed
from kdrun.data import Split
from kdrun.losses.base import DistillationLoss
from kdrun.train.features import each_feature

BATCH_NORM = (nn.modules.batchnorm._BatchNorm,)
DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
           nn.FeatureAlphaDropout)


def shard_changes_math(model: nn.Module | None, loss: DistillationLoss,
                       all_labelled: bool) -> str | None:
    """Why training on shards of each batch is not the same maths as on the whole batch
    (``model`` built on the meta device; None when it could not be), or None."""
    if model is None:
        return ("the model could not be looked at (it starts from weights, or cannot be "
                "built on the meta device)")
    if any(isinstance(m, BATCH_NORM) for m in model.modules()):
        return "batch norm normalises each shard by its own statistics"
    if any(isinstance(m, DROPOUT) and m.p > 0 for m in model.modules()):
        return "each process draws its own dropout masks"
    if not loss.chunks_rows:
        return f"loss={type(loss).__name__} is not a mean of per-row terms"
    if not all_labelled:
        return "the hard-label term averages over each shard's labelled examples"
    return None


def on_shards(compute, split):
    """``compute(split)``, each process computing its shard of the rows of an in-memory
    split (its result a tensor, or a list of tensors, with a row per example), put back
    together on every process; a split read from disk is computed whole by each."""
    world = distributed.world()
    if not world.parallel or not getattr(split, "in_memory", False):
        return compute(split)
    here = world.shard(len(split))
    part = compute(Split(split.x[here], split.y[here]))
    return each_feature(lambda rows: distributed.gather_rows(rows, len(split)), part)
