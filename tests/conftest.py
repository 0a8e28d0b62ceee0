"""Shared fixtures: a real local AgentCenter (mTLS on 127.0.0.1) and agent configs for it."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agentproc import patch_config

from elkeid_center.testing import CenterThread

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "elkeid-go"


@pytest.fixture
def center(tmp_path: Path) -> Iterator[CenterThread]:
    with CenterThread(tmp_path / "certs", files_dir=tmp_path / "files") as c:
        c.start()
        yield c


AgentConfig = Callable[..., Path]


@pytest.fixture
def agent_config(center: CenterThread, tmp_path: Path) -> AgentConfig:
    """Write an agent config for `center`; keyword sections are merged into the TOML."""

    def make(name: str = "agent", via: str = "private", **sections: dict[str, Any]) -> Path:
        path = center.write_agent_config(
            tmp_path / f"{name}.toml", tmp_path / f"{name}-work", via=via  # type: ignore[arg-type]
        )
        return patch_config(path, **sections) if sections else path

    return make
