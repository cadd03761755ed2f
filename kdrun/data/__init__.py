"""Data sets, each registered by name in DATASETS where it is defined, and what every
run does with one: the train/val/test split, label budgets, transfer sets, fingerprints
(kdrun/data/base.py). ``base.py`` holds what every set goes
through; one module per family: ``mnist1d.py`` (the offline default), ``digits.py``,
``synthetic.py``, ``torchvision_sets.py`` (mnist, fashion_mnist, cifar10, cifar100),
``imagefolder.py`` (your own images on disk); ``labels.py`` (label budgets) and
``augment.py`` (crops, flips, rotations). To add a data set: a builder
decorated with ``@DATASETS.register("name")`` in a module of this folder (every module
here is imported with the package) and ``configs/dataset/<name>.yaml``."""

from kdrun.data.base import (
    DATASETS,
    NOT_BUILDER_KEYS,
    Data,
    Split,
    epoch_batches,
    fingerprint,
    load_data,
    subsample_indices,
    transfer_fingerprint,
)
from kdrun.data.raw import RawData
from kdrun.packages import import_every_module

__all__ = ["DATASETS", "NOT_BUILDER_KEYS", "Data", "RawData", "Split", "epoch_batches",
           "fingerprint", "load_data", "subsample_indices", "transfer_fingerprint"]

import_every_module(__name__, __path__)
