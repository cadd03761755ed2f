"""The configs ship inside the package (so an installed kdrun finds them anywhere)."""

from pathlib import Path

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

