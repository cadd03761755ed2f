"""A user's own trained teacher (``teacher.checkpoint=FILE``): read without running
code, fitted to the architecture the teacher config describes, every failure named in
one line."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from kdrun import distributed
from kdrun.models import build_model, describe
from kdrun.models.hubs.pretrained import load_weights, read_state_dict
from kdrun.report.measure import model_figures
from kdrun.run.provenance import given_teacher_material
from kdrun.run.stage import WEIGHTS
from kdrun.run.summary_row import StageResult, SummaryRow
from kdrun.store.cache import StageEntry
from kdrun.store.files import sha256_file
from kdrun.train.fit import metric_on

if TYPE_CHECKING:
    from kdrun.run.stage import RunContext


def load_given_teacher(model_cfg, input_shape, num_classes: int, weights: str,
                       graph=None) -> nn.Module:
    """The model ``model_cfg`` describes with the weights of its ``checkpoint`` file: a
    kdrun checkpoint (its ``weights`` entry, else ``model``) or a plain state dict."""
    source = f"teacher.checkpoint={model_cfg.checkpoint}"
    state = read_state_dict(model_cfg.checkpoint, source, entries=(weights, "model"))
    model = build_model(model_cfg, input_shape, num_classes, "teacher", graph)
    load_weights(model, state, source)
    return model


def evaluate_given_teacher(ctx: RunContext, model_cfg) -> StageResult:
    """The stage of a user's own trained teacher: loaded and evaluated instead of
    trained, with a cache entry of its own for what is computed from it (its logits)."""
    path = Path(model_cfg.checkpoint).expanduser()
    weights = WEIGHTS[ctx.tcfg.distill_from]
    data, device = ctx.data.teacher_data or ctx.data, ctx.device  # the teacher's view
    model = load_given_teacher(model_cfg, data.input_shape, data.num_classes, weights,
                               data.graph).to(device, ctx.dtype)
    entry = StageEntry(ctx.cache_root, given_teacher_material(
        ctx.cfg, model_cfg, sha256_file(path), weights, ctx.numerics, ctx.data_digest))
    if distributed.world().writer:
        with entry.lock():
            entry.record_given(str(path))  # so that files computed from it are tracked
    val_metric, test_metric = (metric_on(model, s.to(device, ctx.dtype),
                                         ctx.tcfg.eval_batch_size, data.metric)
                               for s in (data.val, data.test))
    ctx.events.write("given", "teacher", ctx.cfg.seed, entry.key, checkpoint=str(path))
    row = SummaryRow.evaluated_teacher(
        ctx.row_context, describe(model_cfg), model_figures(model), val_metric, test_metric,
        train_seconds=0.0, reused=True, cache_key=entry.key, checkpoint=str(path))
    return StageResult(row, entry, model)
