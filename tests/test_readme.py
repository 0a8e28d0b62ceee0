"""Every command in README.md's sh code blocks exists as written: make targets are in the
Makefile, each elkeid-agent / elkeid-center subcommand answers --help and lists the options
the README passes, scripts exist and are executable."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROGRAMS = {"elkeid-agent": "elkeid_agent", "elkeid-center": "elkeid_center"}


def sh_commands(markdown: str) -> list[list[str]]:
    """The commands of the ```sh blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```", markdown, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


@cache
def make_targets() -> frozenset[str]:
    rules = re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", (REPO / "Makefile").read_text(), re.M)
    return frozenset(rules)


@cache
def help_text(program: str, subcommands: tuple[str, ...]) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", PROGRAMS[program], *subcommands, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"{program} {' '.join(subcommands)} --help: {proc.stderr}"
    return proc.stdout


def check(words: list[str]) -> None:
    name = Path(words[0]).name
    if words[0] == "make":
        for target in (w for w in words[1:] if "=" not in w and not w.startswith("-")):
            assert target in make_targets(), f"no make target {target!r}"
    elif name in PROGRAMS:
        subcommands = [w for w in words[1:] if not w.startswith("-")][:2]
        # Stop at the first word that is an option's value, not a subcommand.
        while subcommands:
            text = help_text(name, tuple(subcommands))
            if f"usage: {name} {' '.join(subcommands)}" in text.replace("\n", " "):
                break
            subcommands.pop()
        text = help_text(name, tuple(subcommands))
        for option in (w.split("=", 1)[0] for w in words[1:] if w.startswith("--")):
            assert option in text, f"{name} {' '.join(subcommands)} has no {option}"
    else:
        path = REPO / words[0]
        assert path.is_file(), f"unknown command {words}"
        assert path.stat().st_mode & 0o111, f"{words[0]} is not executable"


README_COMMANDS = sh_commands((REPO / "README.md").read_text())


def test_readme_has_commands() -> None:
    assert any(w[0] == "make" for w in README_COMMANDS)
    assert any(Path(w[0]).name == "elkeid-center" for w in README_COMMANDS)


@pytest.mark.parametrize("words", README_COMMANDS, ids=lambda w: " ".join(w)[:60])
def test_readme_command_parses(words: list[str]) -> None:
    check(words)


def test_the_check_has_teeth() -> None:
    with pytest.raises(AssertionError, match="no make target"):
        check(["make", "no-such-target"])
    with pytest.raises(AssertionError, match="has no --no-such-option"):
        check([".venv/bin/elkeid-center", "send", "--no-such-option", "x"])
    with pytest.raises(AssertionError, match="unknown command"):
        check(["tools/no-such-script.sh"])


def test_documents_the_readme_cites_are_in_the_repository() -> None:
    readme = (REPO / "README.md").read_text()
    cited = set(re.findall(r"(?<![\w/.])((?:docs|bench)/[\w.-]+\.md)", readme))
    assert "docs/PROTOCOL.md" in cited
    assert "../" not in readme.split("## Quick start")[0]
    missing = sorted(path for path in cited if not (REPO / path).is_file())
    assert not missing, missing
