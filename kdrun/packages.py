"""Self-registering packages: every module of a package (and of its sub-packages) is
imported when the package is, so that the options it defines register by name. Adding
a model, a data set, a loss or a scheme is then one module in its folder, plus its
YAML, and no import line anywhere else."""

from __future__ import annotations

import importlib
import pkgutil


def import_every_module(package_name: str, path) -> None:
    """Import each module below ``path`` (a package's ``__path__``), sub-packages included."""
    for module in pkgutil.walk_packages(path, prefix=f"{package_name}."):
        importlib.import_module(module.name)
