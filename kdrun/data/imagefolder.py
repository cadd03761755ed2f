"""Image folders on disk (e.g. the food-11 workflow): too big for device memory, so
they are read by a DataLoader with worker processes and torchvision transforms.

Two layouts: one sub-folder per class (``label_from=folder``), or flat folders of
files named ``<label>_<anything>.jpg`` (``label_from=filename_prefix``). Splits come
from ``train_dir`` / ``val_dir`` / ``test_dir``; a missing one is carved from the
training files with a fixed seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from kdrun.checks import number, one_of
from kdrun.data.augment import folder_transforms
from kdrun.data.base import DATASETS, Data, subsample_indices
from kdrun.data.labels import UNLABELED, split_labeled
from kdrun.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class _Images(Dataset):
    def __init__(self, files: list[Path], labels: list[int], transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        try:
            with Image.open(self.files[i]) as image:
                x = self.transform(image.convert("RGB"))
        except OSError as e:  # truncated, corrupt, or not an image at all
            raise DataError(f"{self.files[i]}: unreadable image ({e}); delete or replace "
                            f"it") from e
        return x, self.labels[i], i


class FolderSplit:
    """A split of image files, batched by a DataLoader: the same ``batches`` interface
    as an in-memory Split, yielding (indices, inputs, labels) on ``device``."""

    in_memory = False

    def __init__(self, files, labels, transform, image_size: int, workers: int, device="cpu",
                 dtype: torch.dtype | None = None):
        self.files, self.labels, self.transform = files, labels, transform
        self.image_size, self.workers, self.device = image_size, workers, torch.device(device)
        self.dtype = dtype  # of the inputs it yields; None: as read (float32)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    @property
    def y(self) -> torch.Tensor:
        return torch.tensor(self.labels, dtype=torch.int64)

    def update_digest(self, digest) -> None:
        """Feed each image's name, label and bytes to ``digest`` (content, not paths)."""
        for path, label in zip(self.files, self.labels):
            digest.update(f"{path.name}\0{label}\0".encode())
            digest.update(path.read_bytes())

    def to(self, device, dtype: torch.dtype | None = None) -> FolderSplit:
        return FolderSplit(self.files, self.labels, self.transform, self.image_size,
                           self.workers, device, dtype)

    def joined(self, other: FolderSplit) -> FolderSplit:
        """This split's images, then ``other``'s, read with this split's transform."""
        return FolderSplit(self.files + other.files, self.labels + other.labels,
                           self.transform, self.image_size, self.workers, self.device)

    def batches(self, batch_size: int, generator: torch.Generator | None = None):
        dataset = _Images(self.files, self.labels, self.transform)
        sampler = RandomSampler(dataset, generator=generator) if generator is not None else None
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                            num_workers=self.workers, generator=generator,
                            pin_memory=self.device.type == "cuda")
        for x, y, idx in loader:
            yield (idx.to(self.device), x.to(self.device, self.dtype, non_blocking=True),
                   y.to(self.device, non_blocking=True))


@dataclass
class FolderData:
    """What the ``imagefolder`` builder finds; load_data turns it into splits."""

    train: tuple[list[Path], list[int]]
    val: tuple[list[Path], list[int]] | None
    test: tuple[list[Path], list[int]] | None
    num_classes: int
    test_fraction: float
    normalize: object  # per-channel (x - mean) / std, applied when split.standardize
    image_size: int
    workers: int
    unlabeled: list[Path] | None = None  # images without labels (dataset.unlabeled)

    def to_data(self, name: str, split_cfg, augment_cfg=None, normalize=None) -> Data:
        train, val, test, transfer = split_folder(self, split_cfg, augment_cfg, normalize)
        data = Data(name, train, val, test, self.num_classes)
        if len(transfer):
            data.transfer = transfer
        return data


def list_images(folder: Path, label_from: str) -> tuple[list[Path], list[int]]:
    if not folder.is_dir():
        raise DataError(f"dataset.root: no folder {folder}")
    if label_from == "folder":
        classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
        pairs = [(f, c) for c, name in enumerate(classes) for f in sorted((folder / name).iterdir())
                 if f.suffix.lower() in IMAGE_SUFFIXES]
        empty = [name for name in classes if not any(f.suffix.lower() in IMAGE_SUFFIXES
                                                     for f in (folder / name).iterdir())]
        if empty:
            raise DataError(f"{folder}: class folder {empty[0]} has no images")
    else:
        pairs = []
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                prefix = f.name.split("_")[0]
                if not prefix.isdigit():
                    raise DataError(f"{f}: label_from=filename_prefix expects names like "
                                    f"3_120.jpg (label, underscore, anything)")
                pairs.append((f, int(prefix)))
    if not pairs:
        raise DataError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found "
                        f"with label_from={label_from}")
    return [p[0] for p in pairs], [p[1] for p in pairs]


def list_unlabeled(folder: Path) -> list[Path]:
    """Every image under ``folder``, sub-folders included, in sorted order."""
    if not folder.is_dir():
        raise DataError(f"dataset.unlabeled: no folder {folder}")
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"dataset.unlabeled: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                        f"under {folder}")
    return files


@DATASETS.register("imagefolder", rules={
    "label_from": one_of("folder", "filename_prefix"), "image_size": number(1, integer=True),
    "workers": number(0, integer=True), "test_fraction": number(0, 1, hi_open=True),
    "unlabeled": lambda v: None if v is None or (isinstance(v, str) and v) else (
        "must be a folder of unlabelled images under root, or null")})
def imagefolder(
    root: str, label_from: str = "folder", train_dir: str = "train",
    val_dir: str | None = None, test_dir: str | None = None, test_fraction: float = 0.2,
    image_size: int = 64,
    mean: tuple = (0.485, 0.456, 0.406), std: tuple = (0.229, 0.224, 0.225), workers: int = 2,
    unlabeled: str | None = None,
) -> FolderData:
    """Images under ``root``; see the module docstring and configs/dataset/imagefolder.yaml."""
    from torchvision import transforms as tf

    base = Path(root).expanduser()
    found = {name: list_images(base / d, label_from) if d else None
             for name, d in (("train", train_dir), ("val", val_dir), ("test", test_dir))}
    labels = [y for split in found.values() if split for y in split[1]]
    return FolderData(found["train"], found["val"], found["test"], max(labels) + 1,
                      test_fraction, tf.Normalize(list(mean), list(std)), image_size, workers,
                      list_unlabeled(base / unlabeled) if unlabeled else None)


def split_folder(folder: FolderData, split_cfg, augment_cfg=None, normalize=None):
    """Train / val / test / transfer FolderSplits; missing splits carved with
    ``split_cfg.seed``. As for in-memory data, ``split.max_train`` subsamples the
    training files before the test and validation splits are carved, ``split.max_test``
    the test files, ``split.labeled`` keeps that many (or that share) of the rest
    labelled, stratified by class, and the validation split is carved from those;
    ``split.standardize`` normalises with ``dataset.mean`` / ``dataset.std``, or with
    ``normalize`` (a model's mean and std) when given. Training
    images (the transfer set's too) are augmented as ``dataset.augment`` says."""
    from torchvision import transforms as tf

    files, labels = _subsample(folder.train, split_cfg.max_train, split_cfg.seed)
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(split_cfg.seed))
    take = lambda idx: ([files[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
    cut = 0
    test = folder.test
    if test is None:
        cut = round(len(files) * folder.test_fraction)
        test = take(order[:cut].tolist())
    test = _subsample(test, split_cfg.max_test, split_cfg.seed)
    pool, unlabeled = order[cut:], []
    budget = split_labeled(torch.tensor(labels)[pool], split_cfg.get("labeled"),
                           split_cfg.seed, folder.num_classes) if len(pool) else None
    if budget is not None:
        pool, unlabeled = pool[budget[0]], take(sorted(pool[budget[1]].tolist()))[0]
    val = folder.val
    if val is None:
        n_val = round((len(files) if budget is None else len(pool)) * split_cfg.val_fraction)
        val = take(pool[:n_val].tolist())
        pool = pool[n_val:]
    train = take(sorted(pool.tolist()))
    unlabeled += folder.unlabeled or []
    resize = tf.Resize((folder.image_size, folder.image_size))
    scale = folder.normalize if normalize is None else tf.Normalize(*map(list, normalize))
    finish = [tf.ToTensor(), *([scale] if split_cfg.standardize else [])]

    def make(pair, augment):
        return FolderSplit(*pair, tf.Compose([resize, *augment, *finish]), folder.image_size,
                           folder.workers)

    augment = folder_transforms(augment_cfg, folder.image_size)
    return (make(train, augment), make(val, []), make(test, []),
            make((unlabeled, [UNLABELED] * len(unlabeled)), augment))


def _subsample(pair, limit, seed):
    """At most ``limit`` (file, label) pairs, drawn with ``seed``, in their listed order."""
    files, labels = pair
    keep = subsample_indices(len(files), limit, seed)
    if keep is None:
        return pair
    keep = sorted(keep.tolist())
    return [files[i] for i in keep], [labels[i] for i in keep]
