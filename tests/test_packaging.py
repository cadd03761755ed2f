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


def test_config_yaml_lists_exactly_the_options_of_each_group():
    """The comment beside each group in config.yaml names its options: kept in step."""
    import re

    from kdrun.validate import group_options

    text = (Path(__file__).parents[1] / "configs" / "config.yaml").read_text()
    for group in ("dataset", "teacher", "student", "loss", "scheme", "logger", "hparams_search"):
        comment = re.search(rf"^  - {group}: \S+ +# (.*)$", text, re.M).group(1)
        listed = re.match(r"[\w ]+(?:\| [\w ]+)*", comment).group(0)
        assert sorted(w.strip() for w in listed.split("|")) == group_options(group), group
