"""Shared fixtures."""

import os

import pytest


@pytest.fixture
def skip_cifar_md5(monkeypatch):
    """CIFAR checks the md5 of every batch file; our hand-made batches cannot match."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
