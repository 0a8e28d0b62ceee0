"""Shared fixtures: a real local AgentCenter (mTLS on 127.0.0.1) and agent configs for it."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agentproc import patch_config

from elkeid_center.testing import CenterThread

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "data" / "elkeid-go"

# Tests read nothing outside the clone and /tmp: a clone alone must pass. Everything else
# a test process may legitimately open: the system, the interpreter and its venv.
_ALLOWED = tuple(
    sorted(
        {
            str(REPO),
            "/tmp",
            "/var/tmp",
            tempfile.gettempdir(),
            *(os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)),
            sys.prefix,
            sys.base_prefix,
            "/usr",
            "/etc",
            "/proc",
            "/sys",
            "/dev",
            "/run",
            "/var",
            "/lib",
            "/lib64",
            "/bin",
            "/sbin",
        }
    )
)
_AUDITED = {"open", "os.listdir", "os.scandir", "shutil.copyfile", "shutil.copytree"}
_outside: set[str] = set()


def _allowed(path: str) -> bool:
    return any(path == root or path.startswith(root + "/") for root in _ALLOWED)


def _audit(event: str, args: tuple[Any, ...]) -> None:
    """Record every existing path opened or listed outside the clone (child processes are
    out of reach; their own reads go through paths the tests give them)."""
    if event not in _AUDITED or not args or isinstance(args[0], int) or args[0] is None:
        return
    try:
        path = os.path.abspath(os.fsdecode(args[0]))
        if _allowed(path) or _allowed(os.path.realpath(path)) or not os.path.exists(path):
            return
    except (TypeError, ValueError):
        return
    except RecursionError:
        # An open deep in a recursive walk (the deep-tree tests): a hook that raised there
        # would change what the code under test sees.
        return
    _outside.add(path)


sys.addaudithook(_audit)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _outside:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _outside:
        terminalreporter.section("paths read outside the clone and /tmp", red=True)
        for path in sorted(_outside):
            terminalreporter.write_line(path)


@pytest.fixture
def center(tmp_path: Path) -> Iterator[CenterThread]:
    with CenterThread(tmp_path / "certs", files_dir=tmp_path / "files") as c:
        c.start()
        yield c


AgentConfig = Callable[..., Path]


def _remove_cgroup_groups(names: list[str]) -> None:
    """Remove the (empty) plugin cgroup groups of agents that ended without an orderly stop."""
    from elkeid_agent.plugins.cgroup_plan import plan_layout

    layout = plan_layout(
        Path("/proc/self/cgroup").read_text(), Path("/proc/self/mountinfo").read_text()
    )
    if isinstance(layout, str):
        return
    for hierarchy in layout.hierarchies:
        for name in names:
            group = Path(hierarchy.agent_dir) / name
            for path in [*group.glob("*/"), group]:
                with contextlib.suppress(OSError):
                    path.rmdir()


@pytest.fixture
def agent_config(center: CenterThread, tmp_path: Path) -> Iterator[AgentConfig]:
    """Write an agent config for `center`; keyword sections are merged into the TOML.

    Each config gets a plugin cgroup group of its own, removed after the test."""
    groups: list[str] = []

    def make(name: str = "agent", via: str = "private", **sections: dict[str, Any]) -> Path:
        path = center.write_agent_config(
            tmp_path / f"{name}.toml", tmp_path / f"{name}-work", via=via  # type: ignore[arg-type]
        )
        # Plugin cgroups of their own per config: test runs may overlap on one host.
        groups.append(f"elkeid-test-{uuid.uuid4().hex[:12]}")
        sections["plugins"] = {"cgroup_name": groups[-1], **sections.get("plugins", {})}
        return patch_config(path, **sections)

    yield make
    _remove_cgroup_groups(groups)
