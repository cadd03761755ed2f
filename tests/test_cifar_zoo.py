"""The CIFAR ResNets of the standard KD benchmark: the published parameter counts, the
reference projects' checkpoint layout loading strictly, feature taps by name, and the
multistep learning-rate recipe."""

import pytest
import torch
from omegaconf import OmegaConf

from kdrun.models import build_model, count_params
from kdrun.run import pipeline
from kdrun.run.given_teacher import load_given_teacher
from kdrun.train.features import feature_shape
from kdrun.train.optim import make_schedule
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


# name -> (convolution widths per block, parameters at 100 classes as published, M)
VGG_ZOO = {"vgg8": (((64,), (128,), (256,), (512,), (512,)), 3.97),
           "vgg11": (((64,), (128,), (256, 256), (512, 512), (512, 512)), None),
           "vgg13": (((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)), 9.46),
           "vgg16": (((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3), None),
           "vgg19": (((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4), None)}


def reference_vgg_params(blocks, classes: int = 100) -> int:
    """Parameters of RepDistiller's models/vgg.py VGG(cfg, batch_norm=True), counted from
    its definition: every 3x3 conv has a bias and is followed by a BN (weight and bias);
    no hidden FC layer, one Linear(512, classes)."""
    total, c_in = 0, 3
    for widths in blocks:
        for c_out in widths:
            total += 9 * c_in * c_out + c_out + 2 * c_out
            c_in = c_out
    return total + 512 * classes + classes


def reference_vgg_keys(blocks) -> list[str]:
    """The reference's state-dict keys: in block i, the j-th conv is module 3j of the
    block's Sequential and its BN module 3j + 1 (the ReLUs between hold no weights)."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = []
    for i, widths in enumerate(blocks):
        for j in range(len(widths)):
            keys += [f"block{i}.{3 * j}.weight", f"block{i}.{3 * j}.bias",
                     *(f"block{i}.{3 * j + 1}.{k}" for k in bn)]
    return keys + ["classifier.weight", "classifier.bias"]


def bn(c: int) -> int:
    return 2 * c  # a BatchNorm2d's weight and bias


def reference_mobilenetv2_params(classes: int = 100) -> int:
    """RepDistiller's models/mobilenetv2.py mobile_half (T=6, width 0.5), from its
    definition: a 3x3 stride-2 stem 3 -> 16 + BN; stages (t, c, n) = (1, 8, 1), (6, 12, 2),
    (6, 16, 3), (6, 32, 4), (6, 48, 3), (6, 80, 3), (6, 160, 1), each InvertedResidual
    a bias-free 1x1 c_in -> t*c_in, a 3x3 depthwise, a 1x1 -> c, each with a BN; a 1x1
    160 -> 1280 + BN; Linear(1280, classes)."""
    total, c_in = 27 * 16 + bn(16), 16
    for t, c, n in ((1, 8, 1), (6, 12, 2), (6, 16, 3), (6, 32, 4), (6, 48, 3), (6, 80, 3),
                    (6, 160, 1)):
        for i in range(n):
            src = c_in if i == 0 else c
            mid = src * t
            total += src * mid + bn(mid) + 9 * mid + bn(mid) + mid * c + bn(c)
        c_in = c
    return total + 160 * 1280 + bn(1280) + 1280 * classes + classes


def reference_shufflev1_params(classes: int = 100) -> int:
    """RepDistiller's models/ShuffleNetv1.py ShuffleV1, from its definition: a 1x1 stem
    3 -> 24 + BN; stages of 240, 480, 960 channels with 4, 8, 4 bottlenecks, the first of
    each (stride 2) producing width - c_in channels (its input is concatenated); a
    bottleneck is a 1x1 conv c_in -> c/4 in g groups (g = 1 on the 24-channel stem's
    output, else 3), a 3x3 depthwise, a 1x1 c/4 -> c in 3 groups, each with a BN;
    Linear(960, classes)."""
    total, c_in = 3 * 24 + bn(24), 24
    for width, n in ((240, 4), (480, 8), (960, 4)):
        for i in range(n):
            c_out = width - c_in if i == 0 else width
            mid, g = c_out // 4, 1 if c_in == 24 else 3
            total += c_in * mid // g + bn(mid) + 9 * mid + bn(mid) + mid * c_out // 3 + bn(c_out)
            c_in = width
    return total + 960 * classes + classes


def reference_shufflev2_params(classes: int = 100) -> int:
    """RepDistiller's models/ShuffleNetv2.py ShuffleV2 (net size 1), from its definition:
    a 1x1 stem 3 -> 24 + BN; per stage (116, 232, 464 channels; 3, 7, 3 blocks) a
    DownBlock (3x3 depthwise on c_in, 1x1 c_in -> c/2; 1x1 c_in -> c/2, 3x3 depthwise,
    1x1 c/2 -> c/2; each with a BN) then blocks of 1x1, 3x3 depthwise, 1x1 on c/2
    channels, each with a BN; a 1x1 464 -> 1024 + BN; Linear(1024, classes)."""
    total, c_in = 3 * 24 + bn(24), 24
    for c, n in ((116, 3), (232, 7), (464, 3)):
        h = c // 2
        total += 9 * c_in + bn(c_in) + c_in * h + bn(h) + c_in * h + bn(h)
        total += 9 * h + bn(h) + h * h + bn(h)
        total += n * (h * h + bn(h) + 9 * h + bn(h) + h * h + bn(h))
        c_in = c
    return total + 464 * 1024 + bn(1024) + 1024 * classes + classes


def reference_resnet50_params(classes: int = 100) -> int:
    """RepDistiller's models/resnetv2.py ResNet50, from its definition: a bias-free 3x3
    stem 3 -> 64 + BN; stages of 3, 4, 6, 3 bottlenecks with planes 64, 128, 256, 512
    (1x1 -> p, 3x3, 1x1 -> 4p, each with a BN; a 1x1 projection + BN in each stage's
    first block, where the width or stride changes); Linear(2048, classes)."""
    total, c_in = 27 * 64 + bn(64), 64
    for planes, n in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for i in range(n):
            total += c_in * planes + bn(planes) + 9 * planes * planes + bn(planes)
            total += planes * 4 * planes + bn(4 * planes)
            total += c_in * 4 * planes + bn(4 * planes) if i == 0 else 0
            c_in = 4 * planes
    return total + 2048 * classes + classes


COUNTS = {**{name: (reference_params(depth, widths), published)
              for name, (depth, widths, published) in ZOO.items()},
          **{name: (reference_wrn_params(depth, widen), published)
             for name, (depth, widen, published) in WIDE_ZOO.items()},
          **{name: (reference_vgg_params(blocks), published)
             for name, (blocks, published) in VGG_ZOO.items()},
          "MobileNetV2": (reference_mobilenetv2_params(), 0.81),
          "ShuffleV1": (reference_shufflev1_params(), 0.95),
          "ShuffleV2": (reference_shufflev2_params(), 1.36),
          "ResNet50": (reference_resnet50_params(), 23.71)}
# keys of each reference state dict that only its module names give, and the taps by name
REFERENCE_NAMES = {
    "MobileNetV2": (["conv1.0.weight", "blocks.0.0.conv.0.weight", "blocks.6.0.conv.7.running_var",
                     "conv2.1.weight", "classifier.0.weight"],
                    {"blocks.1": (12, 16, 16), "blocks.6": (160, 2, 2), "penultimate": (1280,)}),
    "ShuffleV1": (["conv1.weight", "layer1.0.conv1.weight", "layer3.3.bn3.running_mean",
                   "linear.weight"],
                  {"layer1": (240, 16, 16), "layer3": (960, 4, 4), "penultimate": (960,)}),
    "ShuffleV2": (["layer1.0.conv5.weight", "layer2.7.conv3.weight", "conv2.weight",
                   "bn2.weight", "linear.bias"],
                  {"layer1": (116, 16, 16), "layer3": (464, 4, 4), "penultimate": (1024,)}),
    "ResNet50": (["layer1.0.shortcut.0.weight", "layer2.0.shortcut.1.running_var",
                  "layer4.2.bn3.weight", "linear.weight"],
                 {"layer4": (2048, 4, 4), "penultimate": (2048,)}),
}


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


@pytest.mark.parametrize("name", VGG_ZOO)
def test_vggs_have_the_reference_module_names_and_block_taps(name):
    model = build_model(OmegaConf.create({"arch": name}), (3, 32, 32), 100)
    assert list(model.state_dict()) == reference_vgg_keys(VGG_ZOO[name][0])
    shapes = [feature_shape(model, f"block{i}", (3, 32, 32), "loss.student_layer")
              for i in range(5)]
    # 32 px: pooled after blocks 0-2 only, as the reference does below 64 px
    assert shapes == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)]
    assert feature_shape(model, "penultimate", (3, 32, 32), "x") == (512,)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 100)


@pytest.mark.parametrize("name", REFERENCE_NAMES)
def test_mobile_nets_and_resnet50_have_the_reference_names_and_taps(name):
    keys, taps = REFERENCE_NAMES[name]
    model = build_model(OmegaConf.create({"arch": name}), (3, 32, 32), 100)
    assert set(keys) <= set(model.state_dict())
    assert {layer: feature_shape(model, layer, (3, 32, 32), "x") for layer in taps} == taps


def test_feature_taps_by_stage_and_penultimate():
    model = build_model(OmegaConf.create({"arch": "resnet32x4"}), (3, 32, 32), 100)
    shapes = {layer: feature_shape(model, layer, (3, 32, 32), "loss.student_layer")
              for layer in ("layer1", "layer2", "layer3", "penultimate")}
    assert shapes == {"layer1": (64, 32, 32), "layer2": (128, 16, 16), "layer3": (256, 8, 8),
                      "penultimate": (256,)}


def lrs(schedule_cfg, epochs=8):
    params = [torch.zeros(1, requires_grad=True)]
    optimizer = torch.optim.SGD(params, lr=0.05)
    schedule = make_schedule(optimizer, OmegaConf.create(schedule_cfg), epochs, 1)
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
                                             ("resnet56", "resnet20"), ("wrn_40_2", "wrn_16_2"),
                                             ("vgg13", "vgg8"), ("resnet32x4", "ShuffleV2")])
def test_the_benchmark_experiments_carry_the_papers_recipe(teacher, student):
    cfg = make_config(f"experiment=cifar100_{teacher}_{student}")
    assert (cfg.teacher.arch, cfg.student.arch, cfg.dataset.name) == (teacher, student, "cifar100")
    t = cfg.trainer
    lr = 0.01 if student.startswith(("Shuffle", "MobileNet")) else 0.05  # as the papers
    assert (t.optimizer, t.lr, t.momentum, t.weight_decay, t.batch_size, t.epochs) == (
        "sgd", lr, 0.9, 0.0005, 64, 240)
    assert (t.schedule, list(t.milestones), t.gamma) == ("multistep", [150, 180, 210], 0.1)
    assert (cfg.loss.name, cfg.loss.T, cfg.loss.alpha) == ("kd", 4, 0.9)
    assert (cfg.dataset.augment.crop_padding, cfg.dataset.augment.hflip) == (4, True)


@pytest.mark.slow  # five CIFAR pairs, 7.4M-parameter teachers among them, on a CPU
@pytest.mark.parametrize("experiment", [
    "cifar100_resnet32x4_resnet8x4", "cifar100_resnet56_resnet20", "cifar100_wrn_40_2_wrn_16_2",
    "cifar100_vgg13_vgg8", "cifar100_resnet32x4_ShuffleV2"])
def test_every_benchmark_experiment_runs_one_epoch_on_tiny_cifar100_files(
        tmp_path, skip_cifar_md5, experiment):
    write_cifar(tmp_path / "data", classes=100, n_per_batch=4)
    cfg = make_config(f"experiment={experiment}", f"dataset.root={tmp_path}/data",
                      "trainer.epochs=1", "trainer.batch_size=8", "progress=false",
                      "latency.repeats_b1=4", "latency.repeats_b256=4", "latency.warmup=0",
                      f"cache.dir={tmp_path}/cache")
    rows = pipeline.run(cfg, tmp_path / "run")["rows"]
    assert [r["role"] for r in rows] == ["teacher", "scratch", "distilled"]
    assert rows[0]["arch"] == cfg.teacher.arch and rows[2]["arch"] == cfg.student.arch
