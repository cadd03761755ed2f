"""int8 students (student.quantize=int8, kdrun/models/quantize.py): the converted model
holds int8 weights and computes what the fake-quantised one does, within the output's
quantisation step; post-training quantisation rounds each weight to its channel's grid;
one run on the default data gives the float32, PTQ and QAT rows, the QAT gain and the
int8 size and latency, reusing the float32 stages of a plain run; and what int8 cannot
run with is refused in one line."""

from __future__ import annotations

import onnx
import pandas as pd
import pytest
import torch

from kdrun.errors import ConfigError
from kdrun.losses import CE
from kdrun.models import build_model
from kdrun.models.quantize import (
    fake_quantized,
    int8_weights,
    output_step,
    post_training_int8,
    to_int8,
)
from kdrun.run import pipeline
from kdrun.run.validate import validate
from tests.helpers import fit_or_snapshot, make_config

SHAPE, CLASSES = (1, 40), 10  # MNIST-1D's


def trained_fake(student: str) -> torch.nn.Module:
    """A fake-quantised student after a few training steps, in eval mode."""
    torch.manual_seed(0)
    fake = fake_quantized(build_model(make_config(f"student={student}").student, SHAPE, CLASSES),
                          SHAPE)
    optimizer = torch.optim.Adam(fake.parameters(), 0.01)
    for _ in range(5):
        loss = fake(torch.randn(64, *SHAPE)).logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return fake.eval()


@pytest.mark.parametrize("student", ["mlp", "cnn"])
def test_the_converted_student_holds_int8_weights_and_computes_the_fake_quantised_outputs(
        student):
    fake = trained_fake(student)
    int8 = to_int8(fake)
    weights = int8_weights(int8)
    layers = [m for m in fake.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d))]
    assert len(weights) == len(layers) >= 3 and all(w.dtype == torch.qint8 for w in weights)
    x = torch.randn(256, *SHAPE)
    with torch.no_grad():
        difference = (int8(x) - fake(x)).abs().max().item()
    step = output_step(int8)
    print(f"{student}: largest |int8 - fake-quantised| = {difference:.4f}, output step {step:.4f}")
    # The two round the same values to the same grids (eval mode froze the observers, so
    # both use the ranges learned in training); the int8 kernels accumulate in int32, the
    # fake-quantised model in float32, so a value on a rounding boundary may still land
    # one step apart. A wrong scale, zero point or range moves the outputs by several
    # steps (ranges that kept learning in eval mode moved every output by 4).
    assert difference <= step


def test_post_training_quantisation_rounds_each_weight_to_its_channels_grid():
    model = build_model(make_config().student, SHAPE, CLASSES).eval()
    int8 = post_training_int8(model, SHAPE, [torch.randn(100, *SHAPE) for _ in range(3)])
    floats = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for ours, theirs in zip(int8_weights(int8), floats):
        scales = ours.q_per_channel_scales()  # one per output channel (symmetric: zero point 0)
        assert (ours.q_per_channel_zero_points() == 0).all()
        grid = theirs.detach().double() / scales[:, None]  # each weight in steps of its channel
        # the nearest step: torch divides in float32, which moves a weight of at most 128
        # steps by 128 x 2^-24 < 1e-5 steps against this float64 division
        assert (ours.int_repr().double() - grid).abs().max() <= 0.5 + 1e-5
        assert ours.int_repr().abs().max() >= 126  # the largest weight of a channel spans it


INT8_RUN = ["progress=false", "repeats=2", "trainer.epochs=2", "latency.repeats_b1=4",
            "latency.repeats_b256=4", "latency.warmup=0"]


@pytest.mark.slow  # make test under 5 minutes (it runs in CI's test-slow)
def test_one_run_gives_the_float32_ptq_and_qat_rows_and_reuses_a_plain_runs_stages(tmp_path):
    cache = f"cache.dir={tmp_path}/cache"
    plain = pipeline.run(make_config(*INT8_RUN, cache), tmp_path / "plain")
    result = pipeline.run(make_config(*INT8_RUN, cache, "student.quantize=int8", "export=onnx"),
                          tmp_path / "int8")
    rows = pd.DataFrame(result["rows"])
    roles = ["scratch", "distilled", "scratch_ptq", "distilled_ptq", "scratch_qat",
             "distilled_qat"]
    assert sorted(rows.role) == sorted(["teacher", *roles * 2])
    float32 = rows[rows.role.isin(["teacher", "scratch", "distilled"])]
    assert float32.reused.all()  # the same stages as the plain run: keys unchanged
    assert list(float32.cache_key) == [r["cache_key"] for r in plain["rows"]]
    for role in roles[2:]:
        int8 = rows[rows.role == role]
        assert (int8.size_mb < rows[rows.role == "scratch"].size_mb.iloc[0] / 2).all()
        assert int8.latency_ms_b1.notna().all() and int8.test_metric_best_val.between(0, 100).all()
    table = result["table"]
    assert "int8 QAT   mlp[100,100] distilled" in table and "gain int8 QAT (best val)" in table
    assert "int8 student: " in table and "smaller than float32's" in table
    assert (tmp_path / "int8" / "checkpoints" / "distilled_qat.pt").exists()
    ops = {node.op_type for node in onnx.load(tmp_path / "int8" / "distilled_int8.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ, checked with onnxruntime on export


@pytest.mark.parametrize("override, says", [
    ("scheme=dml", "scheme=offline"),
    ("loss=fitnet", "use a loss on the logits"),
    ("trainer.float64=true", "set trainer.float64=false"),
    ("student.quantize=int4", "must be null or int8"),
])
def test_what_int8_cannot_run_with_is_refused_in_one_line(override, says):
    with pytest.raises(ConfigError, match="student.quantize") as error:
        validate(make_config("student.quantize=int8", "device=cpu", override))
    assert says in str(error.value) and "\n" not in str(error.value)


def test_a_resumed_quantisation_aware_fit_ends_exactly_where_an_uninterrupted_one_does(
        tmp_path):
    cfg = make_config("dataset=synthetic", "dataset.n=300", "progress=false")
    data = pipeline.load_data(cfg.dataset, cfg.split)

    def train(resume=None, stop_at=None):
        torch.manual_seed(0)
        model = fake_quantized(build_model(cfg.student, data.input_shape, data.num_classes),
                               data.input_shape)
        state = fit_or_snapshot(model, data, CE(), cfg.trainer, stage="scratch_qat", epochs=5,
                                resume=resume, stop_at=stop_at)
        return state if stop_at else model

    full = train()
    torch.save(train(stop_at=2), tmp_path / "state.pt")  # through disk, as after a kill
    resumed = train(resume=torch.load(tmp_path / "state.pt", weights_only=True))
    for name, tensor in full.state_dict().items():  # weights, and the learned ranges
        assert torch.equal(tensor, resumed.state_dict()[name]), name
