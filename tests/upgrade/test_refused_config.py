"""A new version that refuses its config still counts its starts, and is rolled back."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from elkeid_agent.upgrade import swap
from elkeid_agent.upgrade.record import UpgradeRecord
from elkeid_agent.version import VERSION

REPO = Path(__file__).resolve().parents[2]


def test_config_refusing_new_version_is_rolled_back(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    target, prev = work / "elkeid-agent", work / "elkeid-agent.prev"
    target.write_bytes(b"#!/bin/sh\necho new\n")
    prev.write_bytes(b"#!/bin/sh\necho old\n")
    target.chmod(0o700)
    swap.write_record(work, UpgradeRecord(
        from_version="0.0.1", to_version=VERSION, started_at=time.time(),
        target=str(target), prev=str(prev),
    ))
    # A key this version does not know: what a newer schema left behind.
    config = tmp_path / "agent.toml"
    config.write_text(f'work_dir = "{work}"\nnot_a_key = 1\n')
    codes = [
        subprocess.run(
            [sys.executable, "-m", "elkeid_agent", "run", "--config", str(config)],
            cwd=REPO, capture_output=True, timeout=60, check=False,
        ).returncode
        for _ in range(4)
    ]
    assert codes == [78, 78, 78, 75]
    assert target.read_bytes() == b"#!/bin/sh\necho old\n"
    assert VERSION in (work / swap.QUARANTINE_FILE).read_text()
