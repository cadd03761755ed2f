"""Cross-modal data: each example seen in two kinds of input, the teacher reading one
view with its labels, the student the other (Gupta et al. 2016, "Cross Modal
Distillation for Supervision Transfer"); paired by kdrun/data/views.py.

- ``mnist1d_views`` (offline default): an MNIST-1D signal (1 x 40) and a picture of it,
  its line plot rasterised (1 x height x 40: in each column the pixel of the signal's
  value is lit), which keeps the shape and loses the precise values.
- ``paired_folders``: your own images, ``root/<view>/<class>/<name>.<ext>`` for each
  view (e.g. ``rgb/`` and ``depth/``), paired by the path below the view's folder without
  its extension (``rgb/cat/003.jpg`` with ``depth/cat/003.png``); the class is the
  sub-folder. A file without its pair is one line naming it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from kdrun.checks import number
from kdrun.data.base import DATASETS, SEED, UNLABELED_COUNT
from kdrun.data.imagefolder import IMAGE_SUFFIXES
from kdrun.data.mnist1d import mnist1d
from kdrun.data.raw import RawData
from kdrun.data.views import paired
from kdrun.errors import DataError

PLOT_RANGE = 3.0  # the plot's rows span signal values -3..3 (MNIST-1D's are standardised)


def plot(signals: torch.Tensor | None, height: int) -> torch.Tensor | None:
    """(N, 1, L) signals as (N, 1, height, L) pictures of their line plots: in column t
    the row of the signal's value there (values beyond +-PLOT_RANGE in the edge rows)."""
    if signals is None:
        return None
    values = signals[:, 0].clamp(-PLOT_RANGE, PLOT_RANGE)
    rows = ((PLOT_RANGE - values) / (2 * PLOT_RANGE) * (height - 1)).round().long()
    image = torch.zeros(len(signals), height, signals.shape[-1])
    image.scatter_(1, rows.unsqueeze(1), 1.0)
    return image.unsqueeze(1)


@DATASETS.register("mnist1d_views", rules={
    "num_samples": number(10, integer=True), "seed": SEED, "unlabeled": UNLABELED_COUNT,
    "height": number(2, integer=True)})
def mnist1d_views(num_samples: int = 5000, seed: int = 42, cache_dir: str | None = None,
                  unlabeled: int = 0, height: int = 12, teacher_view: str = "signal",
                  student_view: str = "plot") -> RawData:
    """MNIST-1D (kdrun/data/mnist1d.py) as two views, ``signal`` and ``plot``."""
    signal = mnist1d(num_samples, seed, cache_dir, unlabeled)
    pictures = replace(signal, x_train=plot(signal.x_train, height),
                       x_test=plot(signal.x_test, height),
                       x_unlabeled=plot(signal.x_unlabeled, height))
    return paired({"signal": signal, "plot": pictures}, teacher_view, student_view,
                  "mnist1d_views")


@DATASETS.register("paired_folders", rules={
    "image_size": number(1, integer=True), "test_fraction": number(0, 1, lo_open=True,
                                                                   hi_open=True),
    "seed": SEED})
def paired_folders(root: str, teacher_view: str, student_view: str, image_size: int = 32,
                   test_fraction: float = 0.2, seed: int = 0) -> RawData:
    """Two views of each image under ``root`` (see the module docstring), read into
    memory at ``image_size`` x ``image_size``; a test split of ``test_fraction`` drawn
    with ``seed``."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"dataset.root: no folder {base}")
    names = sorted(d.name for d in base.iterdir() if d.is_dir())
    views = {}
    for key, view in (("dataset.teacher_view", teacher_view),
                      ("dataset.student_view", student_view)):
        if view not in names:
            raise DataError(f"{key}={view!r}: no folder {base / view} (the views there: "
                            f"{', '.join(names) or 'none'})")
        views[view] = _listed(base / view)
    keys = sorted(views[teacher_view])
    _check_pairs(views, base)
    classes = sorted({key.split("/")[0] for key in keys})
    labels = torch.tensor([classes.index(key.split("/")[0]) for key in keys])
    perm = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed))
    n_test = round(len(keys) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    as_raw = {view: _images([files[key] for key in keys], image_size)
              for view, files in views.items()}
    raw = {view: RawData(x[train], labels[train], x[test], labels[test], len(classes))
           for view, x in as_raw.items()}
    return paired(raw, teacher_view, student_view, "paired_folders")


def _listed(folder: Path) -> dict[str, Path]:
    """The images of one view by their pairing key, ``<class>/<path without extension>``."""
    files = {}
    for f in sorted(folder.rglob("*")):
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        relative = f.relative_to(folder)
        if len(relative.parts) < 2:
            raise DataError(f"{f}: an image outside a class folder; put it under "
                            f"{folder}/<class>/")
        files[relative.with_suffix("").as_posix()] = f
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its "
                        "class folders")
    return files


def _check_pairs(views: dict[str, dict[str, Path]], base: Path) -> None:
    """Every image has its pair in the other view: else one line naming the first that
    does not."""
    if len(views) < 2:  # one view for both: nothing to pair
        return
    (a, files_a), (b, files_b) = views.items()
    for mine, theirs, other in ((files_a, files_b, b), (files_b, files_a, a)):
        alone = sorted(set(mine) - set(theirs))
        if alone:
            raise DataError(f"{mine[alone[0]]} has no pair in {base / other} (pairs share "
                            f"their path below the view's folder, extension aside); "
                            f"{len(alone)} file(s) of it unpaired")


def _images(files: list[Path], size: int) -> torch.Tensor:
    """The images as one (N, 3, size, size) float tensor in [0, 1]."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    out = torch.empty(len(files), 3, size, size)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as image:
                picture = image.convert("RGB").resize((size, size), Image.BILINEAR)
        except OSError as e:
            raise DataError(f"{path}: unreadable image ({e}); delete or replace it") from e
        out[i] = pil_to_tensor(picture).float() / 255
    return out
