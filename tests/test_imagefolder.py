"""Image folders: both layouts load with the right labels, and the pipeline runs on
them through a DataLoader (the food-11 workflow, on a generated folder)."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from kdrun.data import load_data
from kdrun.errors import DataError
from kdrun.run import pipeline
from tests.helpers import make_config

SPLIT = OmegaConf.create({"val_fraction": 0.25, "seed": 0, "max_train": None,
                          "max_test": None, "standardize": False})


def write_png(path, value: int, size: int = 12):
    """A flat image whose colour encodes its label, so labels can be checked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def class_folders(root, classes=3, per_class=8):
    for c in range(classes):
        for i in range(per_class):
            write_png(root / "train" / f"class{c}" / f"{i}.png", 40 * c)
    return root


def flat_folders(root, classes=3, per_class=8):
    for split in ("training", "validation"):
        for c in range(classes):
            for i in range(per_class):
                write_png(root / split / f"{c}_{i}.png", 40 * c)
    return root


def folder_config(root, **keys):
    base = {"name": "imagefolder", "root": str(root), "label_from": "folder",
            "train_dir": "train", "val_dir": None, "test_dir": None, "test_fraction": 0.25,
            "image_size": 8, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "workers": 0,
            "augment": {"crop_padding": 0, "hflip": False, "rotation": 0.0}}
    return OmegaConf.create({**base, **keys})


def labels_match_colours(split):
    for _, x, y in split.batches(5):
        colour = (x[:, 0, 0, 0] * 255).round() / 40
        assert torch.equal(colour.long(), y)


def test_class_per_folder_layout(tmp_path):
    data = load_data(folder_config(class_folders(tmp_path)), SPLIT)
    assert data.num_classes == 3 and data.input_shape == (3, 8, 8)
    assert (len(data.train), len(data.val), len(data.test)) == (12, 6, 6)
    for split in (data.train, data.val, data.test):
        labels_match_colours(split)


def test_flat_folders_named_by_label_prefix(tmp_path):
    cfg = folder_config(flat_folders(tmp_path), label_from="filename_prefix",
                        train_dir="training", val_dir="validation")
    data = load_data(cfg, SPLIT)
    assert (len(data.train), len(data.val), len(data.test)) == (18, 24, 6)
    for split in (data.train, data.val, data.test):
        labels_match_colours(split)


def test_dataset_augment_changes_training_images_only(tmp_path):
    cfg = folder_config(class_folders(tmp_path), augment={"crop_padding": 2, "hflip": True,
                                                          "rotation": 45.0})
    data = load_data(cfg, SPLIT)
    torch.manual_seed(0)  # the transforms' draws
    train = torch.cat([x for _, x, _ in data.train.batches(4)])
    assert train.shape == (12, 3, 8, 8) and train.dtype == torch.float32
    assert (train == 0).any(dim=(1, 2, 3)).sum() > 4  # rotated: black corners
    for split in (data.val, data.test):  # never augmented: every flat image stays flat
        for _, x, _ in split.batches(4):
            assert torch.equal(x, x[:, :, :1, :1].expand_as(x))


@pytest.mark.parametrize("problem,message", [
    ("no_root", "no folder"),
    ("empty_class", "class folder class1 has no images"),
    ("bad_name", "expects names like 3_120.jpg"),
])
def test_folder_problems_are_named(tmp_path, problem, message):
    keys = {}
    if problem == "empty_class":
        write_png(tmp_path / "train" / "class0" / "a.png", 0)
        (tmp_path / "train" / "class1").mkdir()
    if problem == "bad_name":
        write_png(tmp_path / "train" / "cat.png", 0)
        keys = {"label_from": "filename_prefix"}
    with pytest.raises(DataError, match=message):
        load_data(folder_config(tmp_path, **keys), SPLIT)


def test_pipeline_distills_a_dsconv_student_on_an_image_folder(tmp_path):
    class_folders(tmp_path / "images")
    cfg = make_config("dataset=imagefolder", f"dataset.root={tmp_path}/images",
                      "dataset.image_size=16", "dataset.workers=0", "dataset.augment.hflip=true",
                      "teacher=cnn", "teacher.stride=1", "teacher.pool=max",
                      "student=dsconv", "student.base=4", "student.multipliers=[1,2]",
                      "student.pool_blocks=1", "trainer.optimizer=adamw", "repeats=1",
                      "trainer.epochs=1", "progress=false", f"cache.dir={tmp_path}/cache")
    rows = pipeline.run(cfg, tmp_path / "run")["rows"]
    assert [r["role"] for r in rows] == ["teacher", "scratch", "distilled"]
    assert rows[2]["arch"] == "dsconv[4]"


def test_seed_food11_loads_a_resnet18_teacher_file_and_distills(tmp_path):
    import torchvision

    root = tmp_path / "food-11"
    for split, n in (("training", 4), ("validation", 2), ("evaluation", 2)):
        for c in range(11):
            for i in range(n):
                write_png(root / split / f"{c}_{i}.jpg", 20 * c)
    teacher = torchvision.models.resnet18(num_classes=11)
    torch.save(teacher.state_dict(), tmp_path / "teacher_resnet18.pt")
    cfg = make_config("experiment=seed_food11", f"dataset.root={root}",
                      f"teacher.checkpoint={tmp_path}/teacher_resnet18.pt",
                      "dataset.image_size=32", "dataset.augment.crop_padding=2",
                      "dataset.workers=0",
                      "trainer.epochs=1", "progress=false", f"cache.dir={tmp_path}/cache")
    assert (cfg.loss.T, cfg.loss.alpha, cfg.trainer.batch_size) == (20, 0.5, 32)
    rows = pipeline.run(cfg, tmp_path / "run")["rows"]
    assert rows[0]["epochs"] == 0 and rows[0]["arch"] == "torchvision/resnet18"
    assert rows[2]["arch"] == "dsconv[16]" and rows[2]["compression"] > 10


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_is_named_in_one_line(tmp_path, workers):
    from kdrun.cli.main import one_line_message

    class_folders(tmp_path, classes=2, per_class=3)
    bad = tmp_path / "train" / "class1" / "1.png"
    bad.write_bytes(bad.read_bytes()[:20])  # truncated
    data = load_data(folder_config(tmp_path, workers=workers), SPLIT)
    with pytest.raises(DataError) as e:
        for split in (data.train, data.val, data.test):
            list(split.batches(2))
    line = one_line_message(e.value)
    assert "\n" not in line and line.startswith(str(bad)) and "unreadable image" in line


def test_split_settings_act_on_image_folders_and_relabelling_changes_the_fingerprint(tmp_path):
    from kdrun.data import fingerprint

    cfg = folder_config(class_folders(tmp_path), mean=[0.5] * 3, std=[0.25] * 3)
    limited = OmegaConf.merge(SPLIT, {"max_train": 12, "max_test": 2})
    data = load_data(cfg, limited)
    assert (len(data.train) + len(data.val), len(data.test)) == (12 - 3, 2)  # test carved first
    raw = load_data(cfg, SPLIT)
    scaled = load_data(cfg, OmegaConf.merge(SPLIT, {"standardize": True}))
    _, x_raw, _ = next(raw.test.batches(6))
    _, x_scaled, _ = next(scaled.test.batches(6))
    assert torch.allclose(x_scaled, (x_raw - 0.5) / 0.25)  # dataset.mean / std
    before = fingerprint(raw)
    (tmp_path / "train" / "class0" / "0.png").rename(tmp_path / "train" / "class1" / "x.png")
    assert fingerprint(load_data(cfg, SPLIT)) != before  # one image relabelled
