"""timm and torchvision models as teacher and student: end to end on an image folder,
weights from files and from the libraries' local caches (never the network), the
one-line errors, the stage key holding the weights' content, resize and
normalisation, and the ONNX export."""

from __future__ import annotations

import subprocess
import time

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from kdrun.data import load_data
from kdrun.errors import ConfigError, UserError
from kdrun.models import build_model, model_identity
from kdrun.report.export import export_onnx
from kdrun.run import pipeline
from kdrun.run.provenance import stage_material
from kdrun.train.features import feature_shape
from tests.helpers import KDRUN, make_config, write_cifar

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


def image_folder(root, classes=3, per_class=10, size=32):
    """Images whose mean colour encodes the class, with pixel noise."""
    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(size, size, 3, generator=g) * 80 + 60 * c).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / f"c{c}" / f"{i}.png")
    return root


def folder_run(tmp_path, *overrides):
    root = image_folder(tmp_path / "images") if not (tmp_path / "images").exists() else \
        tmp_path / "images"
    return make_config("dataset=imagefolder", f"dataset.root={root}", "dataset.train_dir=.",
                       "dataset.image_size=32", "dataset.workers=0", "teacher=timm",
                       "teacher.name=resnet18", "student=torchvision",
                       "student.name=mobilenet_v3_small", "trainer.epochs=1", "repeats=1",
                       "progress=false", "num_threads=1", f"cache.dir={tmp_path}/cache",
                       *overrides)


@pytest.mark.parametrize("loss", [
    ["loss=kd"],
    # FitNet by module names: timm ResNet's layer3 (256x2x2) -> torchvision MobileNetV3's
    # features.8 (48x2x2): a 1x1-conv regressor between the maps
    ["loss=fitnet", "loss.teacher_layer=layer3", "loss.student_layer=features.8"],
])
def test_a_timm_teacher_distils_into_a_torchvision_student(tmp_path, loss):
    cfg = folder_run(tmp_path, *loss)
    result = pipeline.run(cfg, tmp_path / "run")
    rows = {row["role"]: row for row in result["rows"]}
    assert rows["teacher"]["arch"] == "timm/resnet18"
    assert rows["distilled"]["arch"] == "torchvision/mobilenet_v3_small"
    assert rows["teacher"]["params"] == sum(
        p.numel() for p in timm.create_model("resnet18", num_classes=3).parameters())
    assert rows["distilled"]["compression"] > 5 and rows["distilled"]["latency_ms_b1"] > 0
    assert "timm/resnet18" in result["table"]


def test_feature_taps_name_zoo_layers_and_penultimate():
    teacher = build_model(OmegaConf.create({"arch": "timm", "name": "resnet18"}), (3, 32, 32), 5)
    student = build_model(OmegaConf.create({"arch": "torchvision", "name": "mobilenet_v3_small"}),
                          (3, 32, 32), 5)
    assert feature_shape(teacher, "penultimate", (3, 32, 32), "k") == (512,)
    assert feature_shape(student, "penultimate", (3, 32, 32), "k") == (1024,)
    assert feature_shape(teacher, "layer3", (3, 32, 32), "k") == (256, 2, 2)
    with pytest.raises(ConfigError, match="not a layer of this model; valid: penultimate, conv1"):
        feature_shape(teacher, "layer9", (3, 32, 32), "loss.teacher_layer")


def zoo_cfg(arch, name, **keys):
    return OmegaConf.create({"arch": arch, "name": name, "pretrained": False, "weights": None,
                             "kwargs": {}, **keys})


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_path_loads_a_saved_state_dict(tmp_path, suffix):
    torch.manual_seed(1)
    saved = timm.create_model("resnet18", num_classes=4)
    path = tmp_path / f"mine{suffix}"
    if suffix == ".pt":
        torch.save({"state_dict": saved.state_dict()}, path)  # a training script's container
    else:
        from safetensors.torch import save_file

        save_file(saved.state_dict(), str(path))
    model = build_model(zoo_cfg("timm", "resnet18", weights=str(path)), (3, 32, 32), 4)
    for (name, mine), theirs in zip(model.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(mine, theirs), name


def test_weights_of_another_head_and_channel_count_are_adapted(tmp_path):
    """ImageNet-style weights (1000 classes, RGB) into a 10-class gray-image model: the
    head keeps its fresh init, the stem is summed over RGB and spread over 1 channel;
    every other tensor is the file's."""
    torch.manual_seed(2)
    rgb = torchvision.models.resnet18(num_classes=1000)
    torch.save(rgb.state_dict(), tmp_path / "imagenet_like.pth")
    torch.manual_seed(3)
    fresh = build_model(zoo_cfg("torchvision", "resnet18"), (1, 28, 28), 10)
    torch.manual_seed(3)
    weights = str(tmp_path / "imagenet_like.pth")
    model = build_model(zoo_cfg("torchvision", "resnet18", weights=weights), (1, 28, 28), 10)
    assert torch.equal(model.fc.weight, fresh.fc.weight)
    assert torch.equal(model.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(model.layer4[1].conv2.weight, rgb.layer4[1].conv2.weight)
    gray = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():  # a gray image gets the response the weights give it in RGB: the
        # same sums in two orders, in float64, less the one float32 rounding of each summed
        # weight (|w| < 0.2: < 1.5e-8 each, times 49 inputs in [0, 1] < 1e-6)
        ours, theirs = model.conv1.double()(gray), rgb.conv1.double()(gray.expand(-1, 3, -1, -1))
        assert float(model.conv1.weight.abs().max()) < 0.2
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)


def test_weights_of_another_architecture_are_refused_in_one_line(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(UserError, match="the file has a layer .* that this model lacks"):
        build_model(zoo_cfg("torchvision", "mobilenet_v3_small", weights=str(tmp_path / "r18.pth")),
                    (3, 32, 32), 10)


def fake_hf_cache(root, repo: str, state: dict) -> None:
    """A Hugging Face hub cache holding ``repo``'s model.safetensors, laid out as
    huggingface_hub writes it (refs/main -> snapshots/<commit>/)."""
    from safetensors.torch import save_file

    folder = root / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    save_file(state, str(folder / "snapshots" / commit / "model.safetensors"))


def test_timm_pretrained_weights_come_from_the_local_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    torch.manual_seed(4)
    cached = timm.create_model("resnet18", num_classes=1000)
    fake_hf_cache(tmp_path / "hub", "timm/resnet18.a1_in1k", cached.state_dict())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = zoo_cfg("timm", "resnet18", pretrained=True)
    model = build_model(cfg, (3, 32, 32), 7)
    assert torch.equal(model.layer2[0].conv1.weight, cached.layer2[0].conv1.weight)
    assert model.fc.out_features == 7
    identity = model_identity(cfg)
    assert identity["library"] == f"timm {timm.__version__}"
    assert len(identity["pretrained_sha256"]) == 64


def test_torchvision_pretrained_weights_come_from_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    file = tmp_path / "torch" / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]
    file.parent.mkdir(parents=True)
    torch.manual_seed(5)
    cached = torchvision.models.resnet18()
    torch.save(cached.state_dict(), file)
    cfg = zoo_cfg("torchvision", "resnet18", pretrained=True)
    model = build_model(cfg, (3, 32, 32), 10)
    assert torch.equal(model.layer1[0].conv1.weight, cached.layer1[0].conv1.weight)
    # the stage key holds the file's content: other weights under the same name, a new key
    key = lambda: stage_material(make_config("teacher=torchvision", "teacher.pretrained=true"),  # noqa: E731
                                 role="teacher", model_cfg=cfg, seed=0, epochs=1, numerics={},
                                 data_digest="d")
    before = key()
    torch.manual_seed(6)
    torch.save(torchvision.models.resnet18().state_dict(), file)
    assert key() != before and key()["model_identity"]["pretrained_sha256"] != \
        before["model_identity"]["pretrained_sha256"]


def run_cli(cwd, *args, env_extra=None):
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    start = time.perf_counter()
    proc = subprocess.run([KDRUN, *args], cwd=cwd, env=env, text=True, capture_output=True,
                          timeout=120)
    return proc, time.perf_counter() - start


@pytest.mark.parametrize("arch, cache_words", [
    ("timm", ["timm's weights timm/resnet18.a1_in1k", "hf/models--timm--resnet18.a1_in1k",
              "timm.create_model('resnet18', pretrained=True)"]),
    pytest.param("torchvision", ["torchvision's weights ResNet18_Weights.IMAGENET1K_V1",
                                 "torch/hub/checkpoints",
                                 "get_model('resnet18', weights='ResNet18_Weights."
                                 "IMAGENET1K_V1')"],
                 marks=pytest.mark.slow),  # make test under 5 minutes: timm's runs there
])
def test_missing_pretrained_weights_offline_is_one_line_and_exit_2(tmp_path, arch, cache_words):
    env = {"HF_HUB_CACHE": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}
    proc, seconds = run_cli(tmp_path, f"student={arch}", "student.name=resnet18",
                            "student.pretrained=true", "dataset=cifar10", env_extra=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("kdrun: error: student.pretrained: ")
    for words in cache_words + ["student.weights=PATH"]:
        assert words in lines[0], (words, lines[0])
    assert seconds < 60  # no download retries
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("arch, typo, close", [
    ("timm", "resnet181", "resnet18"),
    pytest.param("torchvision", "mobilenet_v3_smal", "mobilenet_v3_small",
                 marks=pytest.mark.slow)])  # make test under 5 minutes: timm's runs there
def test_an_unknown_model_name_lists_close_matches(tmp_path, arch, typo, close):
    proc, _ = run_cli(tmp_path, f"teacher={arch}", f"teacher.name={typo}")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"teacher.name='{typo}' is invalid" in proc.stderr
    assert "close matches:" in proc.stderr and close in proc.stderr


def test_unknown_model_kwargs_are_one_line(tmp_path):
    cfg = zoo_cfg("timm", "resnet18", kwargs={"drop_rat": 0.1})
    with pytest.raises(UserError, match="kwargs of timm model resnet18"):
        build_model(cfg, (3, 32, 32), 10)
    model = build_model(zoo_cfg("timm", "resnet18", kwargs={"drop_rate": 0.3}), (3, 32, 32), 10)
    assert model.drop_rate == 0.3


def test_resize_and_model_normalisation_on_in_memory_images(tmp_path, skip_cifar_md5):
    write_cifar(tmp_path / "data")
    cfg = make_config("dataset=cifar10", f"dataset.root={tmp_path}/data", "dataset.resize=16",
                      "dataset.normalize=model", "teacher=timm", "teacher.name=resnet18")
    device, data = pipeline.prepare(cfg)
    assert data.input_shape == (3, 16, 16)
    plain = load_data(make_config("dataset=cifar10", f"dataset.root={tmp_path}/data",
                                  "dataset.resize=16", "split.standardize=false").dataset,
                      make_config("split.standardize=false").split)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)  # timm resnet18.a1_in1k's
    std = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
    # the same two float32 operations: values up to (1 - 0.406) / 0.225 = 2.64, whose float32
    # spacing is 2.4e-7, so an order or fused-kernel difference moves them by < 1e-6
    assert torch.allclose(data.train.x, (plain.train.x - mean) / std, rtol=0, atol=1e-6)
    assert 0 <= plain.train.x.min() and plain.train.x.max() <= 1


def test_normalize_model_needs_a_zoo_model():
    cfg = make_config("dataset=cifar10", "dataset.normalize=model")
    with pytest.raises(ConfigError, match="neither teacher nor student is a timm or torchvision"):
        pipeline.model_input_spec(cfg)


def test_a_pretrained_model_reports_the_input_it_expects(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    file = tmp_path / "torch" / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]
    file.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), file)
    cfg = folder_run(tmp_path, "teacher=torchvision", "teacher.pretrained=true")
    with caplog.at_level("INFO", logger="kdrun"):
        pipeline.report_inputs(cfg, pipeline.prepare(cfg)[1])
    assert ("teacher torchvision/resnet18+pretrained: torchvision ResNet18_Weights.IMAGENET1K_V1 "
            "expects 3x224x224 inputs, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225); "
            "this data: 3x32x32, normalised by its own training statistics") in caplog.text


def test_zoo_students_export_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    model = build_model(zoo_cfg("timm", "test_efficientnet"), (3, 32, 32), 10)  # timm's tiny one
    assert export_onnx(model, (3, 32, 32), tmp_path / "m.onnx") < 1e-4


class Branchy(torch.nn.Module):
    """A model whose control flow depends on the data: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(x) if x.sum() > 0 else -self.head(x)


def test_a_model_that_cannot_be_exported_says_so_in_one_line(tmp_path):
    pytest.importorskip("onnxruntime")
    with pytest.raises(UserError, match="export=onnx: Branchy cannot be exported to ONNX") as e:
        export_onnx(Branchy(), (4,), tmp_path / "b.onnx")
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value)


def test_an_unknown_weights_tag_lists_the_models_tags():
    from kdrun.models.hubs.timm_zoo import check

    with pytest.raises(ConfigError, match="no weights of that tag; its tagged names: "
                                          "resnet18.a1_in1k"):
        check(OmegaConf.create({"name": "resnet18.nope", "pretrained": False}), "teacher")


@pytest.mark.parametrize("module", ["kdrun.models.hubs.timm_zoo",
                                    "kdrun.models.hubs.torchvision_zoo"])
def test_each_zoo_module_imports_on_its_own(module):
    import sys

    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
