"""Every dataset builder: the generated/bundled ones for real, torchvision's on files
written here in torchvision's own on-disk formats (download=False)."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kdrun.data import load_data
from kdrun.errors import DataError
from tests.helpers import write_cifar, write_mnist

SPLIT = OmegaConf.create(
    {"val_fraction": 0.1, "seed": 0, "max_train": None, "max_test": None, "standardize": True})


def load(split=SPLIT, **dataset):
    return load_data(OmegaConf.create(dataset), split)


def test_mnist1d_is_the_standard_set():
    d = load(name="mnist1d", num_samples=5000, seed=42)
    assert (len(d.train), len(d.val), len(d.test)) == (3600, 400, 1000)
    assert d.input_shape == (1, 40) and d.num_classes == 10
    assert d.train.x.dtype == torch.float32 and d.train.y.dtype == torch.int64
    assert sorted(d.test.y.unique().tolist()) == list(range(10))


def test_digits_is_sklearns_bundled_set():
    d = load(name="digits", test_fraction=0.2, seed=0)
    assert len(d.train) + len(d.val) + len(d.test) == 1797
    assert len(d.test) == round(1797 * 0.2)
    assert d.input_shape == (1, 8, 8)


def test_synthetic_labels_follow_a_rule_and_random_labels_evaluate_on_train():
    d = load(name="synthetic", n=300, dim=7, classes=4, random_labels=False, test_fraction=0.2,
             seed=1)
    assert d.input_shape == (7,) and d.num_classes == 4 and d.eval_split == "test"
    assert len(d.test) == 60
    r = load(name="synthetic", n=300, dim=7, classes=4, random_labels=True, test_fraction=0.2,
             seed=1)
    assert r.eval_split == "train"
    assert r.test.x is r.train.x and len(r.train) == 300


def test_val_split_is_disjoint_fixed_by_seed_and_standardised_on_train():
    split = OmegaConf.merge(SPLIT, {"standardize": False})
    a = load(split, name="synthetic", n=200, dim=5, classes=3, random_labels=False,
             test_fraction=0.2, seed=0)
    b = load(split, name="synthetic", n=200, dim=5, classes=3, random_labels=False,
             test_fraction=0.2, seed=0)
    assert torch.equal(a.val.x, b.val.x)
    rows = lambda x: {tuple(r) for r in x.tolist()}  # noqa: E731
    assert not rows(a.train.x) & rows(a.val.x)
    assert len(a.val) == 16  # 10% of the 160 training examples
    s = load(name="synthetic", n=200, dim=5, classes=3, random_labels=False, test_fraction=0.2,
             seed=0)
    assert torch.allclose(s.train.x.mean(0), torch.zeros(5), atol=1e-5)
    assert torch.allclose(s.train.x.std(0), torch.ones(5), atol=1e-5)


def test_max_train_and_max_test_subsample():
    split = OmegaConf.merge(SPLIT, {"max_train": 100, "max_test": 30})
    d = load(split, name="mnist1d", num_samples=5000, seed=42)
    assert (len(d.train), len(d.val), len(d.test)) == (90, 10, 30)


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_family_reads_idx_files(tmp_path, name, folder):
    arrays = write_mnist(tmp_path, folder, n_train=50, n_test=20)
    split = OmegaConf.merge(SPLIT, {"standardize": False, "val_fraction": 0.0})
    d = load(split, name=name, root=str(tmp_path), download=False, channels=1)
    assert d.input_shape == (1, 28, 28) and len(d.train) == 50 and len(d.test) == 20
    # the test split is not shuffled: compare pixels and labels with what was written
    images = torch.tensor(arrays["t10k-images-idx3-ubyte"], dtype=torch.float32) / 255
    assert torch.allclose(d.test.x[:, 0], images)
    assert d.test.y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    rgb = load(split, name=name, root=str(tmp_path), download=False, channels=3)
    assert rgb.input_shape == (3, 28, 28) and torch.equal(rgb.test.x[:, 2], d.test.x[:, 0])


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_reads_pickled_batches(tmp_path, skip_cifar_md5, classes):
    batches = write_cifar(tmp_path, classes=classes, n_per_batch=8)
    split = OmegaConf.merge(SPLIT, {"standardize": False, "val_fraction": 0.0})
    d = load(split, name=f"cifar{classes}", root=str(tmp_path), download=False)
    n_train_files = 5 if classes == 10 else 1
    assert len(d.train) == 8 * n_train_files and len(d.test) == 8
    assert d.input_shape == (3, 32, 32) and d.num_classes == classes
    test_batch = batches["test_batch" if classes == 10 else "test"]
    expected = torch.tensor(test_batch["data"].reshape(-1, 3, 32, 32), dtype=torch.float32) / 255
    assert torch.allclose(d.test.x, expected)


@pytest.mark.parametrize("name,where,file", [
    ("mnist", "MNIST/raw", "train-images-idx3-ubyte"),
    ("fashion_mnist", "FashionMNIST/raw", "t10k-labels-idx1-ubyte"),
    ("cifar10", "cifar-10-batches-py", "data_batch_5"),
    ("cifar100", "cifar-100-python", "meta"),
])
def test_missing_data_set_says_where_to_put_which_files(tmp_path, name, where, file):
    kwargs = {"channels": 1} if "mnist" in name else {}
    with pytest.raises(DataError) as e:
        load(name=name, root=str(tmp_path), download=False, **kwargs)
    message = str(e.value)
    assert f"{tmp_path}/{where}" in message and "download=true" in message
    assert file in message


def test_random_cifar_pixels_are_uint8_scaled(tmp_path, skip_cifar_md5):
    write_cifar(tmp_path, n_per_batch=4)
    d = load(OmegaConf.merge(SPLIT, {"standardize": False}), name="cifar10", root=str(tmp_path),
             download=False)
    assert 0.0 <= float(d.train.x.min()) and float(d.train.x.max()) <= 1.0
    assert np.isclose(float(d.train.x.max()) * 255 % 1, 0, atol=1e-3)
