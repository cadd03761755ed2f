"""Export the distilled student for deployment (``export=onnx``)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from kdrun.errors import UserError
from kdrun.models import build_model, example_inputs
from kdrun.models.quantize import fake_quantized, is_int8, output_step, to_int8
from kdrun.store.files import load_checkpoint

log = logging.getLogger("kdrun")
ONNX_TOLERANCE = 1e-3  # largest |onnxruntime - torch| logit difference an export may show
# trainer.distill_from -> the checkpoint entry of the deployed model's weights (a cohort
# deploys its first member)
DEPLOYED = {"best_val": "deployed_best", "last": "deployed"}


def export_distilled(cfg, data, run_dir, seed: int) -> Path:
    """The distilled student of ``seed`` as ``distilled.onnx`` in the run directory,
    checked: the weights ``trainer.distill_from`` selects (best-validation epoch, or
    last), as in the table."""
    distill_from = cfg.trainer.distill_from
    checkpoint = load_checkpoint(run_dir.checkpoint("distilled", seed, seed))
    model = build_model(cfg.student, data.input_shape, data.num_classes)
    model.load_state_dict(checkpoint[DEPLOYED[distill_from]])
    epoch = checkpoint["best_epoch" if distill_from == "best_val" else "epoch"]
    log.info("exporting the distilled student of seed %d, %s weights (epoch %d)", seed,
             distill_from, epoch)
    path = run_dir.root / "distilled.onnx"
    if export_onnx(model, data.input_shape, path) > ONNX_TOLERANCE:
        raise UserError(f"{path}: onnxruntime's outputs differ from PyTorch's")
    return path


def export_int8(cfg, data, run_dir, seed: int) -> Path:
    """The int8 student distilled quantisation-aware (student.quantize=int8) of ``seed`` as
    ``distilled_int8.onnx`` (QuantizeLinear / DequantizeLinear around float operators:
    ONNX's QDQ format), checked: onnxruntime's outputs within 2 quantisation steps of the
    output of PyTorch's int8 model (the two runtimes may round a requantisation apart)."""
    weights = "best_model" if cfg.trainer.distill_from == "best_val" else "model"
    checkpoint = load_checkpoint(run_dir.checkpoint("distilled_qat", seed, seed))
    fake = fake_quantized(build_model(cfg.student, data.input_shape, data.num_classes),
                          data.input_shape)
    fake.load_state_dict(checkpoint[weights])
    model = to_int8(fake)
    path = run_dir.root / "distilled_int8.onnx"
    step = output_step(model)
    if export_onnx(model, data.input_shape, path, dynamo=False) > 2 * step:
        raise UserError(f"{path}: onnxruntime's outputs differ from PyTorch's int8 ones by more "
                        f"than 2 quantisation steps ({step:.3g} each)")
    return path


def export_onnx(model: nn.Module, input_shape, path: Path, batch: int = 4,
                dynamo: bool = True) -> float:
    """Write ``model`` as ONNX (dynamic batch size), load it back with onnxruntime, and
    return the largest absolute difference between the two runtimes' outputs."""
    try:
        import onnxruntime
    except ImportError as e:
        raise UserError("export=onnx needs onnx, onnxscript and onnxruntime: "
                        "pip install 'kdrun[onnx]'") from e
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # one line per merged constant
    model = model.eval() if is_int8(model) else model.eval().cpu()  # int8: CPU already
    x = example_inputs(model, batch, input_shape)
    try:
        if dynamo:
            torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False,
                              input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},))  # by position:
            # forward's argument is named input in nn.Sequential, x in most zoo models
        else:  # torch.export does not take torch.ao's int8 modules; TorchScript's exporter does
            with warnings.catch_warnings():  # its own deprecation, said at every export
                warnings.simplefilter("ignore", FutureWarning)
                torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["input"],
                                  output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    except Exception as e:  # an operator or control flow the exporter does not support
        cause = e.__cause__ or e  # the exporter wraps the reason in advice on how to report it
        reason = next((line for line in str(cause).splitlines() if line.strip()), repr(cause))
        raise UserError(f"export=onnx: {type(model).__name__} cannot be exported to ONNX "
                        f"({reason.strip()[:160]}); the run's results are written, only the "
                        f"export is missing") from e
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        difference = float((torch.from_numpy(onnx_logits) - model(x)).abs().max())
    log.info("exported %s (max |onnxruntime - torch| = %.2e)", path, difference)
    return difference
