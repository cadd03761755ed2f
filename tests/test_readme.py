"""The README as a newcomer uses it: after `make run`, `source .venv/bin/activate` puts
the commands on the PATH, and every command line of every bash block, pasted into a
shell as it stands, finds its command and parses (each `kdrun` line composes and
validates every job it asks for)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kdrun.cli.preflight import preflight
from kdrun.errors import UserError
from tests.helpers import slurm_commands_on_path

ROOT = Path(__file__).resolve().parents[1]
ACTIVATE = Path(sys.executable).parent / "activate"  # the venv the tests run in
# The commands the README's blocks start with, each installed by `make run` / `make test`
COMMANDS = ("kdrun", "kdrun-report", "kdrun-cache", "make", "tensorboard", "torchrun")
# Lines that need a file of the user's, weights or a tracking server this offline machine
# cannot have: they compose, and stop at validation with the line a user would see here.
# ("Add your own loss / model" needs its example's files: tests/test_own_code.py runs it.)
NEEDS_FILES = {".pretrained=true": "are not in the local cache", ".weights=": "no such file",
               "logger.tracking_uri=http": "logger.tracking_uri",
               "hydra.searchpath=": "not a known option",
               "teacher.name=models/": "not a local folder"}


def readme_lines() -> list[str]:
    """Every command line of README.md's bash blocks, as a user would paste it."""
    text = (ROOT / "README.md").read_text()
    return [line for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
            for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def pasted(tmp_path: Path) -> list[list[str]]:
    """Each README line run by bash after activating the venv, in an empty folder, with
    its command recorded instead of run: the argument lists the commands would get after
    the shell's own expansion (~, $HOME, quotes, brackets)."""
    record = (f'{sys.executable} -c "import json, sys; print(json.dumps(sys.argv[1:]))" '
              '"$@" >> argv.jsonl')
    script = [f'source "{ACTIVATE}"', "set -e",
              *(f'command -v {name} > /dev/null || {{ echo "{name}: not found"; exit 127; }}'
                for name in COMMANDS),
              *(f"{name}() {{ record_argv {name} \"$@\"; }}" for name in COMMANDS),
              *readme_lines()]
    script.insert(1, f"record_argv() {{ {record}; }}")
    out = subprocess.run(["bash", "-c", "\n".join(script)], cwd=tmp_path, text=True,
                         capture_output=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = (tmp_path / "argv.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_every_readme_line_finds_its_command_and_every_kdrun_line_validates(tmp_path,
                                                                           monkeypatch):
    calls = pasted(tmp_path)
    assert len(calls) == len(readme_lines())  # each line ran its one command
    assert calls[0] == ["make", "run"] and calls[1] == ["make", "test"]
    kdrun_calls = [kdrun_arguments(argv) for argv in calls if kdrun_arguments(argv) is not None]
    assert len(kdrun_calls) >= 40
    assert any(argv[0] == "torchrun" for argv in calls)
    slurm_commands_on_path(monkeypatch, tmp_path / "slurm")  # as on a cluster's login node
    for argv in kdrun_calls:
        expected = [message for key, message in NEEDS_FILES.items() if any(key in a for a in argv)]
        if not expected:
            preflight(argv)  # a parse error, bad key or value raises UserError here
            continue
        with pytest.raises(UserError, match=expected[0]):
            preflight(argv)


def kdrun_arguments(argv: list[str]) -> list[str] | None:
    """The arguments kdrun gets from a README line: ``kdrun ARGS``, or ``torchrun ...
    -m kdrun ARGS``; None for another command."""
    if argv[0] == "kdrun":
        return argv[1:]
    if argv[0] == "torchrun":
        start = argv.index("-m")
        assert argv[start + 1] == "kdrun", argv
        return argv[start + 2:]
    return None


def test_after_make_run_the_activated_shell_runs_kdrun(tmp_path):
    out = subprocess.run(["bash", "-c", f'source "{ACTIVATE}" && kdrun --cfg job'],
                         cwd=tmp_path, text=True, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "dataset:" in out.stdout and "name: mnist1d" in out.stdout


def test_the_readme_says_how_to_activate_right_after_its_two_commands():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    assert [line.split()[:2] for line in first_block.splitlines()] == [["make", "run"],
                                                                       ["make", "test"]]
    after = text.split("```", 2)[2][:400]
    assert "source .venv/bin/activate" in after
    makefile = (ROOT / "Makefile").read_text()
    run_target = makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert "activate" in run_target  # make run ends by saying how
