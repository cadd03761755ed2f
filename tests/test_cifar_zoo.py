"""The CIFAR ResNets of the standard KD benchmark: the published parameter counts, the
reference projects' checkpoint layout loading strictly, feature taps by name, and the
multistep learning-rate recipe."""

import pytest
import torch
from omegaconf import OmegaConf

from kdrun import pipeline
from kdrun.features import feature_shape
from kdrun.given_teacher import load_given_teacher
from kdrun.models import build_model, count_params
from kdrun.train import make_schedule
from tests.helpers import make_config, write_cifar

NARROW, WIDE = (16, 16, 32, 64), (32, 64, 128, 256)
# name -> (depth, widths, parameters at 100 classes as CRD / RepDistiller publish them, M)
ZOO = {"resnet8": (8, NARROW, None), "resnet14": (14, NARROW, None),
       "resnet20": (20, NARROW, 0.28), "resnet32": (32, NARROW, None),
       "resnet44": (44, NARROW, None), "resnet56": (56, NARROW, 0.86),
       "resnet110": (110, NARROW, 1.74), "resnet8x4": (8, WIDE, 1.23),
       "resnet32x4": (32, WIDE, 7.43)}


def reference_params(depth: int, widths, classes: int = 100) -> int:
    """Parameters of RepDistiller's models/resnet.py ResNet(depth, widths, 'basicblock'),
    counted from its definition: a bias-free 3x3 stem conv and its BN; per stage n =
    (depth - 2) / 6 BasicBlocks of two bias-free 3x3 convs, each with a BN (weight and
    bias), the first block of a stage adding a bias-free 1x1 conv and BN when its stride
    (2 for stages 2 and 3) or width changes; then a Linear(width, classes)."""
    n = (depth - 2) // 6
    total = 3 * 3 * 3 * widths[0] + 2 * widths[0]
    c_in = widths[0]
    for stage, c_out in enumerate(widths[1:]):
        for block in range(n):
            first = c_in if block == 0 else c_out
            total += 9 * first * c_out + 2 * c_out + 9 * c_out * c_out + 2 * c_out
            if block == 0 and (stage > 0 or first != c_out):
                total += first * c_out + 2 * c_out
        c_in = c_out
    return total + widths[3] * classes + classes


def reference_keys(depth: int, widths) -> list[str]:
    """The state-dict keys of RepDistiller's ResNet, by its module names: a stage's first
    block has a ``downsample`` when its stride is 2 or its width changes."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight", *(f"bn1.{k}" for k in bn)]
    n = (depth - 2) // 6
    for stage in (1, 2, 3):
        for block in range(n):
            p = f"layer{stage}.{block}"
            keys += [f"{p}.conv1.weight", *(f"{p}.bn1.{k}" for k in bn),
                     f"{p}.conv2.weight", *(f"{p}.bn2.{k}" for k in bn)]
            if block == 0 and (stage > 1 or widths[0] != widths[1]):
                keys += [f"{p}.downsample.0.weight", *(f"{p}.downsample.1.{k}" for k in bn)]
    return keys + ["fc.weight", "fc.bias"]


# name -> (depth, widen factor, parameters at 100 classes as published, M)
WIDE_ZOO = {"wrn_16_1": (16, 1, None), "wrn_16_2": (16, 2, 0.70), "wrn_40_1": (40, 1, None),
            "wrn_40_2": (40, 2, 2.26)}


def reference_wrn_params(depth: int, widen: int, classes: int = 100) -> int:
    """Parameters of RepDistiller's models/wrn.py WideResNet(depth, widen), counted from
    its definition: a bias-free 3x3 stem conv (16 channels, no BN); per stage n =
    (depth - 4) / 6 pre-activation blocks of BN(c_in), a bias-free 3x3 conv c_in ->
    c_out, BN(c_out), a bias-free 3x3 conv, and a bias-free 1x1 shortcut conv when
    c_in != c_out; a final BN and a Linear(64 * widen, classes)."""
    n, widths = (depth - 4) // 6, (16, 16 * widen, 32 * widen, 64 * widen)
    total = 3 * 3 * 3 * widths[0]
    for stage in range(3):
        for block in range(n):
            c_in, c_out = widths[stage] if block == 0 else widths[stage + 1], widths[stage + 1]
            total += 2 * c_in + 9 * c_in * c_out + 2 * c_out + 9 * c_out * c_out
            total += c_in * c_out if c_in != c_out else 0
    return total + 2 * widths[3] + widths[3] * classes + classes


COUNTS = {**{name: (reference_params(depth, widths), published)
              for name, (depth, widths, published) in ZOO.items()},
          **{name: (reference_wrn_params(depth, widen), published)
             for name, (depth, widen, published) in WIDE_ZOO.items()}}


@pytest.mark.parametrize("name", COUNTS)
def test_parameter_counts_match_the_reference_definition_and_the_published_ones(name):
    expected, published = COUNTS[name]
    model = build_model(OmegaConf.create({"arch": name}), (3, 32, 32), 100)
    assert count_params(model) == expected
    if published is not None:
        assert round(count_params(model) / 1e6, 2) == published
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_wide_resnets_have_the_reference_module_names_and_stage_taps():
    model = build_model(OmegaConf.create({"arch": "wrn_40_2"}), (3, 32, 32), 100)
    names = [k for k in model.state_dict() if k.startswith(("block1.layer.0.", "block2.layer.0."))]
    assert names[:7] == ["block1.layer.0.bn1.weight", "block1.layer.0.bn1.bias",
                         "block1.layer.0.bn1.running_mean", "block1.layer.0.bn1.running_var",
                         "block1.layer.0.bn1.num_batches_tracked", "block1.layer.0.conv1.weight",
                         "block1.layer.0.bn2.weight"]
    assert "block1.layer.0.convShortcut.weight" in names  # 16 -> 32 channels
    assert "block2.layer.0.convShortcut.weight" in names
    assert [k for k in model.state_dict() if not k.startswith("block")] == [
        "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
        "bn1.num_batches_tracked", "fc.weight", "fc.bias"]
    assert feature_shape(model, "block3", (3, 32, 32), "loss.student_layer") == (128, 8, 8)


def test_a_checkpoint_in_the_reference_layout_loads_strictly_as_the_teacher(tmp_path):
    ours = build_model(OmegaConf.create({"arch": "resnet8x4"}), (3, 32, 32), 100)
    assert list(ours.state_dict()) == reference_keys(8, WIDE)
    torch.manual_seed(0)
    state = {k: torch.randn_like(v.float()).to(v.dtype) if v.dtype.is_floating_point else v
             for k, v in ours.state_dict().items()}
    state = {k: v.abs() if k.endswith("running_var") else v for k, v in state.items()}
    torch.save({"epoch": 240, "model": state, "best_acc": 73.1}, tmp_path / "ckpt.pth")
    cfg = OmegaConf.create({"arch": "resnet8x4", "checkpoint": str(tmp_path / "ckpt.pth")})
    teacher = load_given_teacher(cfg, (3, 32, 32), 100, "best_model")
    ours.load_state_dict(state)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher.eval()(x), ours.eval()(x))


def test_feature_taps_by_stage_and_penultimate():
    model = build_model(OmegaConf.create({"arch": "resnet32x4"}), (3, 32, 32), 100)
    shapes = {layer: feature_shape(model, layer, (3, 32, 32), "loss.student_layer")
              for layer in ("layer1", "layer2", "layer3", "penultimate")}
    assert shapes == {"layer1": (64, 32, 32), "layer2": (128, 16, 16), "layer3": (256, 8, 8),
                      "penultimate": (256,)}


def lrs(schedule_cfg, epochs=8):
    params = [torch.zeros(1, requires_grad=True)]
    optimizer = torch.optim.SGD(params, lr=0.05)
    schedule = make_schedule(optimizer, OmegaConf.create(schedule_cfg), epochs)
    out = []
    for _ in range(epochs):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return out, optimizer


def test_multistep_equals_torchs_multisteplr_and_warms_up_linearly():
    ours, _ = lrs({"schedule": "multistep", "milestones": [3, 5], "gamma": 0.1,
                   "warmup_epochs": 0})
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    reference = torch.optim.lr_scheduler.MultiStepLR(optimizer, [3, 5], 0.1)
    expected = []
    for _ in range(8):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert ours == pytest.approx(expected, rel=1e-12)
    warm, _ = lrs({"schedule": "multistep", "milestones": [3, 5], "gamma": 0.1,
                   "warmup_epochs": 2})
    assert warm[:3] == pytest.approx([0.025, 0.05, 0.05]) and warm[3:] == pytest.approx(ours[3:])


def test_a_cifar100_resnet_pair_distills_on_tiny_cifar_files(tmp_path, skip_cifar_md5):
    write_cifar(tmp_path / "data", classes=100, n_per_batch=8)
    cfg = make_config("dataset=cifar100", f"dataset.root={tmp_path}/data", "teacher=resnet14",
                      "student=resnet8", "trainer.epochs=2", "trainer.schedule=multistep",
                      "trainer.milestones=[1]", "trainer.optimizer=sgd", "repeats=1",
                      "progress=false", "latency.repeats_b1=4", "latency.repeats_b256=4",
                      "latency.warmup=0", f"cache.dir={tmp_path}/cache")
    rows = pipeline.run(cfg, tmp_path / "run")["rows"]
    assert [r["arch"] for r in rows] == ["resnet14", "resnet8", "resnet8"]
    assert rows[2]["compression"] == pytest.approx(181108 / 83892, rel=1e-3)


@pytest.mark.parametrize("teacher,student", [("resnet32x4", "resnet8x4"),
                                             ("resnet56", "resnet20"), ("wrn_40_2", "wrn_16_2")])
def test_the_benchmark_experiments_carry_the_papers_recipe(teacher, student):
    cfg = make_config(f"experiment=cifar100_{teacher}_{student}")
    assert (cfg.teacher.arch, cfg.student.arch, cfg.dataset.name) == (teacher, student, "cifar100")
    t = cfg.trainer
    assert (t.optimizer, t.lr, t.momentum, t.weight_decay, t.batch_size, t.epochs) == (
        "sgd", 0.05, 0.9, 0.0005, 64, 240)
    assert (t.schedule, list(t.milestones), t.gamma) == ("multistep", [150, 180, 210], 0.1)
    assert (cfg.loss.name, cfg.loss.T, cfg.loss.alpha) == ("kd", 4, 0.9)
    assert (cfg.dataset.augment.crop_padding, cfg.dataset.augment.hflip) == (4, True)
