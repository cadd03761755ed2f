"""Data set builders, registered by name in DATASETS, and the train/val/test split.

A builder returns a ``RawData`` (tensors, already scaled to a sensible range);
``load_data`` then carves the validation split from the training data with a
fixed seed, optionally subsamples, and standardises with training statistics.
All data sets here are small enough to live in memory as tensors. To add a data
set: write its builder, add it to DATASETS, add ``configs/dataset/<name>.yaml``.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from kdrun.checks import boolean, number, one_of
from kdrun.errors import DataError
from kdrun.labels import UNLABELED, split_labeled
from kdrun.registry import Registry
from kdrun.store import load_sealed, save_sealed

# name -> builder(**keys) returning something with .to_data(name, split_cfg, augment_cfg): RawData
# here, FolderData for image folders (kdrun/imagefolder.py); a config may also name a
# builder of your own package by its import path (name: mypackage.data.my_set)
DATASETS = Registry("dataset")
SEED = number(integer=True)
Stats = tuple[tuple[float, ...], tuple[float, ...]]  # per-channel mean, std
FRACTION = number(0, 1, lo_open=True, hi_open=True)


@dataclass
class RawData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    random_labels: bool = False  # labels carry no signal: evaluate on the training data
    x_unlabeled: torch.Tensor | None = None  # extra transfer-set examples (dataset.unlabeled)
    y_unlabeled: torch.Tensor | None = None  # their true labels, where the data has them: read
    # only by the "scratch, all labels" reference, never by a distilled student

    def to_data(self, name: str, split_cfg, augment_cfg=None, normalize=None) -> Data:
        """In-memory data is augmented later, batched on the device (kdrun/augment.py)."""
        return _split_tensors(name, self, split_cfg, normalize)


@dataclass
class Split:
    """A split held in memory as tensors (on the training device during training)."""

    x: torch.Tensor  # float32, (N, *input_shape)
    y: torch.Tensor  # int64, (N,)
    in_memory = True

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def to(self, device, dtype: torch.dtype | None = None) -> Split:
        """On ``device``; the inputs in ``dtype`` when given (trainer.float64)."""
        return Split(self.x.to(device, dtype), self.y.to(device))

    def joined(self, other: Split) -> Split:
        """This split's examples, then ``other``'s."""
        return Split(torch.cat([self.x, other.x]), torch.cat([self.y, other.y]))

    def batches(self, batch_size: int, generator: torch.Generator | None = None):
        """(indices, inputs, labels) per batch: in a random order fixed by ``generator``
        (every example once), or in order when there is none."""
        if generator is None:
            order = torch.arange(len(self), device=self.x.device).split(batch_size)
        else:
            order = epoch_batches(len(self), batch_size, generator, self.x.device)
        for idx in order:
            yield idx, self.x[idx], self.y[idx]


def epoch_batches(n: int, batch_size: int, generator: torch.Generator, device) -> tuple:
    """Index tensors of one epoch: a random permutation of range(n), cut into batches.
    Every example is visited exactly once; the order is fixed by the generator."""
    return torch.randperm(n, generator=generator).to(device).split(batch_size)


@dataclass
class Data:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    eval_split: str = "test"  # "train" when the labels are random: accuracy is memorisation
    digest: str | None = None  # fingerprint(), once computed
    # The transfer set: examples whose labels the distilled student never sees (their y
    # is UNLABELED), from split.labeled and dataset.unlabeled; None when there are none.
    transfer: Split | None = None
    transfer_labels: torch.Tensor | None = None  # their true labels where known (reference row)
    transfer_digest: str | None = None  # transfer_fingerprint(), once computed

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.train.input_shape

    @property
    def unlabeled_count(self) -> int:
        return len(self.transfer) if self.transfer is not None else 0

    def distill_train(self) -> Split:
        """What a distilled student trains on: the labelled training split, then the
        transfer set (labels UNLABELED). An epoch of the distill stage is one pass over
        both."""
        return self.train if self.transfer is None else self.train.joined(self.transfer)

    def training_on(self, train: Split) -> Data:
        """This data with ``train`` as the training split a stage learns from, and no
        transfer set of its own."""
        return replace(self, train=train, transfer=None, transfer_labels=None, digest=None,
                       transfer_digest=None)

    def all_labels_train(self) -> Split | None:
        """The training split and the transfer set with its true labels (the "scratch,
        all labels" reference), or None when the transfer set's labels are unknown."""
        if self.transfer is None or self.transfer_labels is None:
            return None
        return self.train.joined(Split(self.transfer.x, self.transfer_labels))


# ---------------------------------------------------------------- builders


UNLABELED_COUNT = number(0, integer=True)


@DATASETS.register("mnist1d", rules={"num_samples": number(10, integer=True), "seed": SEED,
                                     "unlabeled": UNLABELED_COUNT})
def mnist1d(num_samples: int = 5000, seed: int = 42, cache_dir: str | None = None,
            unlabeled: int = 0) -> RawData:
    """MNIST-1D (Greydanus 2020), generated locally with the package's standard
    arguments: 4 000 train / 1 000 test sequences of length 40. Never downloads.
    ``unlabeled`` more sequences come from the same generator under a seed of their
    own (so none repeats a train or test sequence), standardised as the package
    standardises every set it makes: by that set's own mean and std."""
    d = _mnist1d_arrays(num_samples, seed, cache_dir)
    as_x = lambda a: a.to(torch.float32).unsqueeze(1)  # noqa: E731 (N, 1, 40)
    as_y = lambda a: a.to(torch.int64)  # noqa: E731
    raw = RawData(as_x(d["x"]), as_y(d["y"]), as_x(d["x_test"]), as_y(d["y_test"]), 10)
    if unlabeled:
        extra = _mnist1d_arrays(-(-unlabeled // 10) * 10, unlabeled_seed(seed), cache_dir)
        x, y = (torch.cat([extra[k], extra[f"{k}_test"]])[:unlabeled] for k in ("x", "y"))
        raw.x_unlabeled, raw.y_unlabeled = as_x(x), as_y(y)
    return raw


def unlabeled_seed(seed: int) -> int:
    """The generator seed of a data set's extra unlabelled examples: never a seed the
    labelled data of a small seed uses."""
    return int.from_bytes(hashlib.sha256(f"unlabeled:{seed}".encode()).digest()[:4], "big")


@functools.lru_cache(maxsize=4)  # sweep jobs in one process generate it once
def _mnist1d_arrays(num_samples: int, seed: int, cache_dir: str | None) -> dict:
    """The package's generated arrays (x, y, x_test, y_test) as tensors. Generating takes
    seconds of pure Python, so they are kept in ``cache_dir`` (a checksummed file, one
    per package version and arguments) for later runs."""
    from importlib.metadata import version

    path = None
    if cache_dir:
        name = f"mnist1d-{version('mnist1d')}-n{num_samples}-seed{seed}.pt"
        path = Path(cache_dir).expanduser() / name
    d = load_sealed(path) if path else None
    if d is None:
        from mnist1d.data import get_dataset_args, make_dataset  # slow to import

        args = get_dataset_args()
        args.num_samples, args.seed = num_samples, seed
        d = {k: torch.tensor(v) for k, v in make_dataset(args).items()
             if k in ("x", "y", "x_test", "y_test")}
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_sealed(path, d)
    return d


@DATASETS.register("digits", rules={"test_fraction": FRACTION, "seed": SEED})
def digits(test_fraction: float = 0.2, seed: int = 0) -> RawData:
    """scikit-learn's bundled 8x8 handwritten digits (1 797 images, UCI); the test
    split is carved with ``seed`` since the set has none of its own."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.int64)
    return _carve_test(x, y, test_fraction, seed, num_classes=10)


@DATASETS.register("synthetic", rules={
    "n": number(10, integer=True), "dim": number(1, integer=True),
    "classes": number(2, integer=True), "random_labels": boolean, "test_fraction": FRACTION,
    "seed": SEED, "unlabeled": UNLABELED_COUNT})
def synthetic(
    n: int = 2000, dim: int = 50, classes: int = 5, random_labels: bool = False,
    test_fraction: float = 0.2, seed: int = 0, unlabeled: int = 0,
) -> RawData:
    """Gaussian features; labels from a hidden random one-hidden-layer network, so
    that a test split means something. ``random_labels=true`` draws labels at random
    instead (the seed script's memorisation setting): accuracy is then measured on
    the training data and labelled as such. ``unlabeled`` more examples are drawn
    from the same distribution with a generator of their own."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    if random_labels:
        if unlabeled:
            raise DataError("dataset.unlabeled: random labels cannot be distilled from a "
                            "transfer set (there is nothing to generalise); set it to 0")
        y = torch.randint(0, classes, (n,), generator=g)
        return RawData(x, y, x, y, classes, random_labels=True)
    w1 = torch.randn(dim, 64, generator=g) / dim**0.5
    w2 = torch.randn(64, classes, generator=g)
    rule = lambda v: (torch.tanh(v @ w1 * 2) @ w2).argmax(1)  # noqa: E731
    raw = _carve_test(x, rule(x), test_fraction, seed, classes)
    if unlabeled:
        extra = torch.Generator().manual_seed(unlabeled_seed(seed))
        raw.x_unlabeled = torch.randn(unlabeled, dim, generator=extra)
        raw.y_unlabeled = rule(raw.x_unlabeled)
    return raw


def _carve_test(x, y, test_fraction, seed, num_classes) -> RawData:
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = round(len(y) * test_fraction)
    te, tr = perm[:n_test], perm[n_test:]
    return RawData(x[tr], y[tr], x[te], y[te], num_classes)


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


# dataset config keys that are not builder arguments (normalize: kdrun/pipeline.py)
NOT_BUILDER_KEYS = ("name", "augment", "normalize")


# ---------------------------------------------------------------- splits


# In-memory data already built in this process, by its settings and the state of its
# files: the jobs of a sweep run in one process (the basic and batched launchers) build
# each data set once. A few entries at most: each holds a whole data set.
_LOADED: dict[str, Data] = {}
_LOADED_MAX = 4


def load_data(dataset_cfg, split_cfg, normalize: Stats | None = None) -> Data:
    """Build the data set ``dataset_cfg.name`` (its other keys are the builder's
    arguments) and split it into train / val / test as ``split_cfg`` says. The
    validation split may be empty (``val_fraction=0``): models are then selected by
    their last epoch. ``normalize`` (per-channel mean and std, e.g. a pretrained model's)
    replaces the training data's own statistics when ``split.standardize`` is on. An
    empty training or test split is a DataError. In-memory data
    built earlier in this process with the same settings and unchanged files is reused
    (never modify a returned Data in place)."""
    key = _load_key(dataset_cfg, split_cfg, normalize)
    if key in _LOADED:
        return _LOADED[key]
    data = _build(dataset_cfg, split_cfg, normalize)
    if data.train.in_memory:
        if len(_LOADED) >= _LOADED_MAX:
            _LOADED.clear()
        _LOADED[key] = data
    return data


def _load_key(dataset_cfg, split_cfg, normalize) -> str:
    """The settings, and the size and modification time of every file under the data
    set's root (none for generated data): a changed file is a new key."""
    from omegaconf import OmegaConf

    settings = [OmegaConf.to_container(c, resolve=True) if OmegaConf.is_config(c) else c
                for c in (dataset_cfg, split_cfg)]
    files = []
    root = dataset_cfg.get("root")
    if root and os.path.isdir(root):
        for folder, _, names in sorted(os.walk(root)):
            for name in sorted(names):
                stat = os.stat(os.path.join(folder, name))
                files.append((folder, name, stat.st_size, stat.st_mtime_ns))
    return hashlib.sha256(repr((settings, normalize, files)).encode()).hexdigest()


def _build(dataset_cfg, split_cfg, normalize: Stats | None) -> Data:
    name = dataset_cfg.name
    params = {k: v for k, v in dict(dataset_cfg).items() if k not in NOT_BUILDER_KEYS}
    builder = DATASETS.get(name, "dataset.name")
    data = builder(**params).to_data(name, split_cfg, dataset_cfg.get("augment"), normalize)
    for split in ("train", "test"):
        if len(getattr(data, split)) == 0:
            raise DataError(f"dataset={name}: the {split} split is empty with these settings "
                            f"(split.max_train, split.max_test, split.val_fraction, "
                            f"dataset.test_fraction); keep at least one {split} example")
    return data


def _split_tensors(name: str, raw: RawData, split_cfg, normalize: Stats | None = None) -> Data:
    x, y = _subsample(raw.x_train, raw.y_train, split_cfg.max_train, split_cfg.seed)
    if raw.random_labels:  # nothing to generalise to: report memorisation of the training set
        if split_cfg.get("labeled") is not None:
            raise DataError("split.labeled: random labels cannot be distilled from a transfer "
                            "set (there is nothing to generalise); set it to null")
        train = Split(x, y)
        return Data(name, train, train, train, raw.num_classes, eval_split="train")
    budget = split_labeled(y, split_cfg.get("labeled"), split_cfg.seed, raw.num_classes)
    transfer = _transfer_set(x, y, budget, raw)
    if budget is not None:  # the validation split is carved from the labelled part only
        x, y = x[budget[0]], y[budget[0]]
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_cfg.seed))
    n_val = round(len(y) * split_cfg.val_fraction)
    val, train = perm[:n_val], perm[n_val:]
    x_test, y_test = _subsample(raw.x_test, raw.y_test, split_cfg.max_test, split_cfg.seed)
    splits = [Split(x[train], y[train]), Split(x[val], y[val]), Split(x_test, y_test)]
    if transfer is not None:
        splits.append(transfer[0])
    if split_cfg.standardize and len(splits[0]):  # by the labelled training split's statistics
        mean, std = _stats(splits[0].x) if normalize is None else _given(normalize, splits[0].x)
        for s in splits:
            s.x = (s.x - mean) / std
    data = Data(name, *splits[:3], raw.num_classes)
    if transfer is not None:
        data.transfer, data.transfer_labels = splits[3], transfer[1]
    return data


def _transfer_set(x, y, budget, raw: RawData) -> tuple[Split, torch.Tensor | None] | None:
    """The unlabelled examples (labels UNLABELED): the training examples outside the label
    budget, then the data set's extra unlabelled ones; and their true labels where the
    data has them all."""
    parts_x, parts_y = [], []
    if budget is not None:
        parts_x.append(x[budget[1]])
        parts_y.append(y[budget[1]])
    if raw.x_unlabeled is not None and len(raw.x_unlabeled):
        parts_x.append(raw.x_unlabeled)
        parts_y.append(raw.y_unlabeled)
    if not parts_x:
        return None
    inputs = torch.cat(parts_x)
    known = all(part is not None for part in parts_y)
    labels = torch.cat(parts_y) if known else None
    return Split(inputs, torch.full((len(inputs),), UNLABELED, dtype=torch.int64)), labels


def fingerprint(data: Data) -> str:
    """A hash of the examples and labels of every split, as the models see them: the
    stage cache keys data by content, so changed files on disk are never mistaken for
    the data a cached stage was trained on. In-memory data is hashed once."""
    if data.train.in_memory and data.digest is not None:
        return data.digest
    data.digest = _content_hash((data.train, data.val, data.test))
    return data.digest


def transfer_fingerprint(data: Data) -> str | None:
    """The same hash of the transfer set (its labels are all UNLABELED: the hidden ones
    never enter it), or None when there is none: part of the key of every stage that
    trains on it."""
    if data.transfer is None:
        return None
    if not data.transfer.in_memory or data.transfer_digest is None:
        data.transfer_digest = _content_hash((data.transfer,))
    return data.transfer_digest


def _content_hash(splits) -> str:
    digest = hashlib.sha256()
    for split in splits:
        if split.in_memory:
            for tensor in (split.x, split.y):
                digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
                digest.update(tensor.contiguous().cpu().numpy())  # hashed in place, no copy
        else:
            split.update_digest(digest)
        digest.update(b"|")
    return digest.hexdigest()[:20]


def subsample_indices(n: int, limit: int | None, seed: int) -> torch.Tensor | None:
    """``limit`` of ``range(n)`` drawn with ``seed`` (split.max_train / max_test), or
    None when there is nothing to drop."""
    if limit is None or limit >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]


def _subsample(x, y, limit, seed):
    keep = subsample_indices(len(y), limit, seed)
    return (x, y) if keep is None else (x[keep], y[keep])


def _given(normalize: Stats, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Given per-channel statistics, shaped for (N, C, ...) inputs of ``x``'s channels."""
    mean, std = (torch.tensor(v, dtype=x.dtype) for v in normalize)
    if x.ndim < 3 or x.shape[1] != len(mean):
        raise DataError(f"dataset.normalize=model: the model's statistics are for "
                        f"{len(mean)} channels, this data's inputs have shape "
                        f"{tuple(x.shape[1:])} (for gray images: dataset.channels=3)")
    shape = (len(mean),) + (1,) * (x.ndim - 2)
    return mean.view(shape), std.view(shape)


def _stats(x: torch.Tensor):
    """Per-channel mean/std for (N, C, ...) inputs, per-feature for flat (N, D)."""
    dims = [0] + list(range(2, x.ndim))
    mean = x.mean(dim=dims, keepdim=True)[0]
    if len(x) < 2:  # one example has no spread: centre it only
        return mean, torch.ones_like(mean)
    std = x.std(dim=dims, keepdim=True)[0].clamp_min(1e-6)
    return mean, std


from kdrun import imagefolder  # noqa: E402, F401  (registers dataset=imagefolder)
