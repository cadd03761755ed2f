"""The ``kdrun`` command (main.py): every job composed and validated before anything
trains (preflight.py), then Hydra runs the pipeline; user mistakes end in one line."""

from kdrun.cli.main import hydra_main, main

__all__ = ["hydra_main", "main"]
