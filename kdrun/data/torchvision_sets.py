"""torchvision's data sets (MNIST, Fashion-MNIST, CIFAR-10, CIFAR-100), read from their own
on-disk formats under ``dataset.root``; a missing or corrupt set says which files to put
where."""

from __future__ import annotations

import os

import torch

from kdrun.checks import boolean, number, one_of
from kdrun.data.base import DATASETS
from kdrun.data.raw import RawData
from kdrun.errors import DataError


def _torchvision(cls_name: str, root: str, download: bool, channels: int | None,
                 resize: int | None = None) -> RawData:
    """A torchvision data set read from its own on-disk format under ``root``."""
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    root = os.path.expanduser(root)
    try:
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=download)
    except (RuntimeError, OSError) as e:  # missing files offline, or no network for download
        raise DataError(_missing_message(cls, root, download, e)) from e
    x_train, x_test = _images(train.data), _images(test.data)
    if channels and channels != x_train.shape[1]:
        x_train, x_test = (x.expand(-1, channels, -1, -1).contiguous() for x in (x_train, x_test))
    if resize:
        x_train, x_test = resized(x_train, resize), resized(x_test, resize)
    targets = lambda ds: torch.as_tensor(ds.targets, dtype=torch.int64)  # noqa: E731
    return RawData(x_train, targets(train), x_test, targets(test), len(train.classes))


def resized(x: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """(N, C, H, W) images resized to ``size`` x ``size`` once, in memory (bilinear,
    antialiased when shrinking, as torchvision's Resize on tensors); refused with one line
    when the result would not fit in half of this machine's memory."""
    n, c = x.shape[:2]
    need = n * c * size * size * x.element_size()
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have / 2:
        raise DataError(f"dataset.resize={size}: {n:,} images of {c}x{size}x{size} need "
                        f"{need / 2**30:.1f} GiB in memory, more than half of this machine's "
                        f"{have / 2**30:.0f} GiB; choose a smaller size")
    out = torch.empty(n, c, size, size, dtype=x.dtype)
    for start in range(0, n, chunk):
        out[start:start + chunk] = torch.nn.functional.interpolate(
            x[start:start + chunk], size=(size, size), mode="bilinear", align_corners=False,
            antialias=size < x.shape[-1]).clamp_(0, 1)
    return out


def _images(data) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W) in [0, 1]."""
    x = torch.as_tensor(data)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x.float().div_(255.0)


def _missing_message(cls, root: str, download: bool, error: Exception) -> str:
    if hasattr(cls, "resources"):  # MNIST family: raw idx files
        folder = os.path.join(root, cls.__name__, "raw")
        files = [os.path.basename(url).removesuffix(".gz") for url, _ in cls.resources]
    else:  # CIFAR family: pickled batches
        folder = os.path.join(root, cls.base_folder)
        files = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    if download:
        return (f"could not download {cls.__name__} ({str(error).splitlines()[0]}); with no "
                f"network, put {', '.join(files)} in {folder}")
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if not missing:  # all there, yet unreadable: torchvision's checksum or shape check failed
        return (f"{cls.__name__} files in {folder} are truncated or corrupt "
                f"({str(error).splitlines()[0][:100]}); replace them with complete copies of "
                f"{', '.join(files)}, or delete them and set dataset.download=true")
    return (f"{cls.__name__} not found: put {', '.join(missing)} in {folder}, or set "
            f"dataset.download=true (needs internet)")


RESIZE = number(1, integer=True, optional=True)
MNIST_RULES = {"download": boolean, "channels": one_of(1, 3), "resize": RESIZE}


@DATASETS.register("mnist", rules=MNIST_RULES)
def mnist(root: str = "data", download: bool = False, channels: int = 1,
          resize: int | None = None) -> RawData:
    """MNIST (LeCun et al. 1998) via torchvision; ``channels=3`` copies the gray channel."""
    return _torchvision("MNIST", root, download, channels, resize)


@DATASETS.register("fashion_mnist", rules=MNIST_RULES)
def fashion_mnist(root: str = "data", download: bool = False, channels: int = 1,
                  resize: int | None = None) -> RawData:
    """Fashion-MNIST (Xiao et al. 2017) via torchvision."""
    return _torchvision("FashionMNIST", root, download, channels, resize)


@DATASETS.register("cifar10", rules={"download": boolean, "resize": RESIZE})
def cifar10(root: str = "data", download: bool = False, resize: int | None = None) -> RawData:
    """CIFAR-10 (Krizhevsky 2009) via torchvision."""
    return _torchvision("CIFAR10", root, download, None, resize)


@DATASETS.register("cifar100", rules={"download": boolean, "resize": RESIZE})
def cifar100(root: str = "data", download: bool = False, resize: int | None = None) -> RawData:
    """CIFAR-100 (Krizhevsky 2009), 100 fine labels, via torchvision."""
    return _torchvision("CIFAR100", root, download, None, resize)
