"""The configs ship inside the package (so an installed kdrun finds them anywhere)."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_group_is_a_listed_package():
    pyproject = (ROOT / "pyproject.toml").read_text()
    groups = [".".join(d.relative_to(ROOT / "configs").parts) for d in (ROOT / "configs").rglob("*")
              if d.is_dir() and not d.name.startswith("__")]
    assert "hydra.launcher" in groups
    for group in groups:
        assert f'"kdrun.configs.{group}"' in pyproject, f"add kdrun.configs.{group} to pyproject"


def test_every_yaml_key_has_a_comment():
    """Configs are the interface: each key says what it does (experiments excepted:
    they restate keys documented in their groups)."""
    for path in (ROOT / "configs").rglob("*.yaml"):
        if path.parent.name == "experiment":
            continue
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if not stripped or stripped.startswith(("#", "-")) or stripped.endswith(":"):
                continue
            if ":" in stripped and not stripped.startswith(("format:", "dir:", "subdir:")):
                assert "#" in stripped, f"{path.relative_to(ROOT)}: '{stripped}' has no comment"



@pytest.mark.slow  # builds a wheel
def test_a_regular_install_lets_hydra_discover_the_batched_launcher(tmp_path):
    """In a wheel, hydra/launcher=batched is found by Hydra's own plugin scan (an
    editable install hides it from that scan; kdrun.cli.main registers it there)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("kdrun-*.whl")
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    assert (unpacked / "hydra_plugins" / "kdrun_batched_launcher" / "batched_launcher.py").is_file()
    assert (unpacked / "kdrun" / "sweep" / "published.csv").is_file()  # kdrun-report --published
    source = {str(p.relative_to(ROOT)) for p in (ROOT / "kdrun").rglob("*.py")}
    wheel_modules = {str(p.relative_to(unpacked)) for p in (unpacked / "kdrun").rglob("*.py")}
    assert source <= wheel_modules, source - wheel_modules  # every sub-package is listed
    assert not (unpacked / "hydra_plugins" / "__init__.py").exists()  # a namespace package
    scan = ("from hydra.core.plugins import Plugins; from hydra.plugins.launcher import Launcher;"
            "print(sorted(c.__name__ for c in Plugins.instance().discover(Launcher)))")
    out = subprocess.run([sys.executable, "-c", scan], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(unpacked)})
    assert "BatchedLauncher" in out.stdout, out.stderr[-2000:]


def test_no_source_file_is_ignored_by_git():
    """A file git ignores never reaches a clone: a .gitignore line once hid kdrun/data/."""
    import shutil

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    sources = [str(p.relative_to(ROOT)) for folder in ("kdrun", "configs", "tests", "docs",
                                                       "benchmarks", "hydra_plugins")
               for p in (ROOT / folder).rglob("*") if p.is_file()
               and p.suffix in (".py", ".yaml", ".md", ".csv", ".json", ".sh")]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *sources], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    assert not ignored, ignored
