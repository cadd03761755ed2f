"""Export the distilled student for deployment (``export=onnx``)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from kdrun.errors import UserError

log = logging.getLogger("kdrun")


def export_onnx(model: nn.Module, input_shape, path: Path, batch: int = 4) -> float:
    """Write ``model`` as ONNX (dynamic batch size), load it back with onnxruntime, and
    return the largest absolute difference between the two runtimes' outputs."""
    try:
        import onnxruntime
    except ImportError as e:
        raise UserError("export=onnx needs onnx, onnxscript and onnxruntime: "
                        "pip install 'kdrun[onnx]'") from e
    model = model.eval().cpu()
    x = torch.randn(batch, *input_shape)
    torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False,
                      input_names=["input"], output_names=["logits"],
                      dynamic_shapes={"input": {0: torch.export.Dim("batch")}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        difference = float((torch.from_numpy(onnx_logits) - model(x)).abs().max())
    log.info("exported %s (max |onnxruntime - torch| = %.2e)", path, difference)
    return difference
