"""The upgrade hold (issue 22, point 4): `upgrade.hold = true` or `ctl hold` keeps the running
version whatever the server pushes; `ctl release` lets the pushed version in, no restart."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from agentproc import REPO, AgentProcess, patch_config, wait_until

from elkeid_agent.commands import ConfigSpec
from elkeid_agent.config import Config, UpgradeConfig
from elkeid_agent.doctor import check_upgrade_hold
from elkeid_agent.upgrade.hold import HOLD_FILE, hold_source, read_hold
from elkeid_agent.upgrade.manager import StartupResult, UpgradeManager, settings_from
from elkeid_agent.upgrade.state import UpgradeState
from elkeid_center.testing import CenterThread

ARTIFACT = "elkeid-agent-9.9.tar.gz"


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "elkeid_agent", "ctl", *args],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=60, check=False,
    )


def test_ctl_hold_and_release_write_and_remove_the_file(tmp_path: Path) -> None:
    done = ctl("--work-dir", str(tmp_path), "hold", "--reason", "canary first")
    assert done.returncode == 0, done.stderr
    record = read_hold(tmp_path)
    assert record is not None
    assert record.reason == "canary first"
    assert hold_source(tmp_path, False) == "ctl"
    assert hold_source(tmp_path, True) == "config"
    assert ctl("--work-dir", str(tmp_path), "release").returncode == 0
    assert not (tmp_path / HOLD_FILE).exists()
    assert hold_source(tmp_path, False) == ""


def test_doctor_reports_the_hold(tmp_path: Path) -> None:
    config = Config(work_dir=str(tmp_path), upgrade=UpgradeConfig(hold=True))
    assert "held by upgrade.hold" in check_upgrade_hold(config).detail
    config = Config(work_dir=str(tmp_path))
    assert "not held" in check_upgrade_hold(config).detail
    (tmp_path / HOLD_FILE).write_text("{}")
    assert "held by `ctl hold`" in check_upgrade_hold(config).detail


def test_pushed_version_is_not_downloaded_while_held_then_is_once_released(
    tmp_path: Path,
) -> None:
    files = tmp_path / "files"
    files.mkdir()
    (files / ARTIFACT).write_bytes(b"not an agent")
    with CenterThread(tmp_path / "certs", files_dir=files) as center:
        center.set_configs([{
            "name": "elkeid-agent", "version": "9.9", "sha256": "ab" * 32,
            "download_urls": [center.file_url(ARTIFACT)],
        }])
        config = patch_config(
            center.write_agent_config(tmp_path / "agent.toml", tmp_path / "work"),
            transport={"heartbeat_interval": 0.3},
        )
        work = tmp_path / "work"
        work.mkdir()
        assert ctl("--work-dir", str(work), "hold").returncode == 0
        with AgentProcess(config) as agent:

            def held_beats() -> list[dict[str, str]]:
                return [r.fields for r in center.records(1000)
                        if r.fields.get("upgrade_held_version") == "9.9"]

            beats = wait_until(lambda: len(held_beats()) >= 3 and held_beats(), 30)
            assert beats[-1]["upgrade_hold"] == "ctl"
            assert center.file_requests() == []
            status = json.loads(ctl("--work-dir", str(work), "status", "--json").stdout)
            assert (status["upgrade_hold"], status["upgrade_held_version"]) == ("ctl", "9.9")

            assert ctl("--work-dir", str(work), "release").returncode == 0
            wait_until(center.file_requests, 30)
            assert center.file_requests() == [f"/{ARTIFACT}"]
            assert agent.proc is not None
            assert agent.proc.poll() is None  # the same process: no restart for either
            agent.stop()
        assert "held by `ctl hold`" in agent.log()
        assert "upgrade hold released" in agent.log()


def test_config_hold_keeps_the_push_out(tmp_path: Path) -> None:
    async def scenario() -> UpgradeManager:
        manager = UpgradeManager(
            tmp_path, emit=lambda _: None, errors={}, request_exit=lambda: None,
            startup=StartupResult(False, UpgradeState.IDLE), env={},
            settings=settings_from(UpgradeConfig(hold=True)), version="1.0",
        )
        await manager.consider(ConfigSpec(name="elkeid-agent", version="9.9",
                                          sha256="ab" * 32, download_urls=("http://x/a",)))
        manager.recheck_hold()
        return manager

    manager = asyncio.run(scenario())
    assert (manager.hold, manager.held_version) == ("config", "9.9")
    assert manager._pending is None


def test_a_newer_set_without_the_agent_drops_the_held_version(tmp_path: Path) -> None:
    manager = UpgradeManager(
        tmp_path, emit=lambda _: None, errors={}, request_exit=lambda: None,
        startup=StartupResult(False, UpgradeState.IDLE), env={},
        settings=settings_from(UpgradeConfig()), version="1.0",
    )
    assert ctl("--work-dir", str(tmp_path), "hold").returncode == 0
    asyncio.run(manager.consider(ConfigSpec(name="elkeid-agent", version="9.9",
                                            sha256="ab" * 32, download_urls=("http://x/a",))))
    assert manager.held_version == "9.9"
    # The server withdrew the upgrade, then the hold is released: nothing is tried.
    asyncio.run(manager.withdraw())
    assert ctl("--work-dir", str(tmp_path), "release").returncode == 0
    manager.recheck_hold()
    assert (manager.hold, manager.held_version) == ("", "")
    assert manager._pending is None


def test_a_version_held_replaces_the_wish_not_yet_tried(tmp_path: Path) -> None:
    manager = UpgradeManager(
        tmp_path, emit=lambda _: None, errors={}, request_exit=lambda: None,
        startup=StartupResult(False, UpgradeState.IDLE), env={},
        settings=settings_from(UpgradeConfig()), version="1.0",
    )

    def spec(version: str) -> ConfigSpec:
        return ConfigSpec(name="elkeid-agent", version=version, sha256="ab" * 32,
                          download_urls=("http://x/a",))

    asyncio.run(manager.consider(spec("9.8")))  # noted; run() has not taken it yet
    assert ctl("--work-dir", str(tmp_path), "hold").returncode == 0
    asyncio.run(manager.consider(spec("9.9")))
    # The newer set's version is the one held; the older wish is gone, not tried meanwhile.
    assert manager.held_version == "9.9"
    assert manager._pending is None


def test_a_refused_newer_version_replaces_the_wish_not_yet_tried(tmp_path: Path) -> None:
    manager = UpgradeManager(
        tmp_path, emit=lambda _: None, errors={}, request_exit=lambda: None,
        startup=StartupResult(False, UpgradeState.IDLE), env={},
        settings=settings_from(UpgradeConfig()), version="1.0",
    )
    newer = ConfigSpec(name="elkeid-agent", version="9.9", sha256="ab" * 32)
    manager._retry_at[(newer.version, newer.sha256)] = time.monotonic() + 600  # failed lately
    asyncio.run(manager.consider(ConfigSpec(name="elkeid-agent", version="9.8",
                                            sha256="cd" * 32)))
    asyncio.run(manager.consider(newer))
    assert manager._pending is None
