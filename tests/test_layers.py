"""The architecture written once in pyproject.toml ([tool.importlinter]) holds: every
package imports only from the layers below it, and no modules import each other in a
cycle. And the check can fail: a copy of kdrun with one upward import breaks it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = str(Path(sys.executable).parent / "lint-imports")


def lint(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=300)


def test_kdrun_keeps_its_layers_and_has_no_import_cycles():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "Contracts: 2 kept, 0 broken." in out.stdout


def test_an_upward_import_breaks_the_layers_and_a_cycle(tmp_path):
    shutil.copytree(ROOT / "kdrun", tmp_path / "kdrun",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    store = tmp_path / "kdrun" / "store" / "files.py"  # a low layer reaching up to run/
    store.write_text(store.read_text() + "\nfrom kdrun.run import pipeline  # noqa\n")
    out = lint(tmp_path, pythonpath=tmp_path)
    assert out.returncode != 0
    assert "kdrun.store is not allowed to import kdrun.run" in out.stdout
    assert "kdrun.store.files -> kdrun.run.pipeline" in out.stdout
    assert "Contracts: 0 kept, 2 broken." in out.stdout  # and it closes a cycle
