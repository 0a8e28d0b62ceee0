"""The UpgradeManager in-process, with real files, real HTTP and real child processes: the
package-manager path (a stand-in dpkg on PATH), one attempt at a time, refusals, and the
start-up check's edge cases."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from floods import long_name_bomb_tar_gz
from upgradetools import answering, http_files, make_deb, make_rpm, need_dpkg_deb, sha

from elkeid_agent.commands import ConfigSpec
from elkeid_agent.upgrade import swap
from elkeid_agent.upgrade.manager import (
    StartupResult,
    UpgradeManager,
    UpgradeSettings,
    check_pending_upgrade,
)
from elkeid_agent.upgrade.record import UpgradeRecord
from elkeid_agent.upgrade.rollback import boot_time
from elkeid_agent.upgrade.state import UpgradeState

A = answering("A")
B = answering("B")
HANG = b"#!/bin/sh\nexec sleep 300\n"

# dpkg as the manager sees it: `-S` says whether it owns the path, `-i` installs the
# package's /etc/elkeid/elkeid-agent over $TARGET (or fails, leaving it alone).
FAKE_DPKG = """#!/bin/sh
case "$1" in
    -S) [ "$OWNED" = yes ] && echo "elkeid-agent: $2" && exit 0; exit 1 ;;
    -i) echo "$2" >> "$DPKG_LOG"
        [ "$INSTALL" = fail ] && echo "dpkg: error processing archive" && exit 1
        dpkg-deb --fsys-tarfile "$2" | tar -xO ./etc/elkeid/elkeid-agent > "$TARGET.dpkg-new"
        chmod 700 "$TARGET.dpkg-new" && mv "$TARGET.dpkg-new" "$TARGET" ;;
esac
"""


# rpm likewise; its -Uvh installs the executable staged at $NEW (how rpm unpacks is not
# what these tests are about).
FAKE_RPM = """#!/bin/sh
case "$1" in
    -qf) [ "$OWNED" = yes ] && echo "elkeid-agent-3:2.0-1.x86_64" && exit 0; exit 1 ;;
    -Uvh) echo "$2" >> "$RPM_LOG"; cp "$NEW" "$TARGET.rpmnew" && mv "$TARGET.rpmnew" "$TARGET" ;;
esac
"""


class Harness:
    def __init__(self, work: Path, env: dict[str, str] | None = None,
                 startup: StartupResult | None = None, **settings: float) -> None:
        self.records: list[bytes] = []
        self.errors: dict[str, str] = {}
        self.counted: list[str] = []
        self.exit_requested = asyncio.Event()
        self.manager = UpgradeManager(
            work,
            emit=self.records.append,
            errors=self.errors,
            request_exit=self.exit_requested.set,
            startup=startup or StartupResult(False, UpgradeState.IDLE),
            env=env or {"PATH": "/usr/bin:/bin"},
            settings=UpgradeSettings(**settings),  # type: ignore[arg-type]
            version="A",
            count=self.counted.append,
        )


def setup_work(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    (work / "tmp").mkdir(parents=True)
    (work / "elkeid-agent").write_bytes(A)
    (work / "elkeid-agent").chmod(0o700)
    return work


def spec(version: str, body: bytes, url: str) -> ConfigSpec:
    return ConfigSpec(name="elkeid-agent", version=version, sha256=sha(body),
                      download_urls=(url,))


async def until(cond: Callable[[], object], limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.02)


async def drive(h: Harness, *configs: ConfigSpec, done: Callable[[], object]) -> None:
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(h.manager.run())
        for config in configs:
            await h.manager.consider(config)
        await until(done)
        runner.cancel()


def fake_dpkg_env(tmp_path: Path, work: Path, owned: bool, install: str = "ok") -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dpkg").write_text(FAKE_DPKG)
    (bin_dir / "dpkg").chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "OWNED": "yes" if owned else "no",
            "INSTALL": install, "TARGET": str(work / "elkeid-agent"),
            "DPKG_LOG": str(tmp_path / "dpkg.log")}


@pytest.fixture(autouse=True)
def no_systemd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Whatever the test host runs, the package manager runs directly here.
    monkeypatch.setattr(swap, "SYSTEMD_RUNNING", tmp_path / "no-systemd")


@need_dpkg_deb
def test_deb_owned_by_dpkg_is_installed_with_dpkg(tmp_path: Path) -> None:
    work = setup_work(tmp_path)
    deb = make_deb(tmp_path / "b.deb", B).read_bytes()
    h = Harness(work, fake_dpkg_env(tmp_path, work, owned=True))
    with http_files({"/b.deb": deb}) as base:
        asyncio.run(drive(h, spec("B", deb, base + "/b.deb"), done=h.exit_requested.is_set))
    assert h.manager.state == "swapped"
    assert (work / "elkeid-agent").read_bytes() == B
    assert (work / "elkeid-agent.prev").read_bytes() == A
    record = swap.read_record(work)
    assert record is not None
    assert (record.method, record.from_version, record.to_version) == ("dpkg", "A", "B")
    assert (tmp_path / "dpkg.log").read_text().strip().endswith("/candidate.deb")


@need_dpkg_deb
def test_dpkg_failure_leaves_a_and_reports(tmp_path: Path) -> None:
    work = setup_work(tmp_path)
    deb = make_deb(tmp_path / "b.deb", B).read_bytes()
    h = Harness(work, fake_dpkg_env(tmp_path, work, owned=True, install="fail"))
    with http_files({"/b.deb": deb}) as base:
        asyncio.run(drive(h, spec("B", deb, base + "/b.deb"), done=lambda: h.errors))
    assert h.manager.state == "idle"
    assert "dpkg: error processing archive" in h.errors["upgrade"]
    assert "-i" in h.manager.last_error
    assert (work / "elkeid-agent").read_bytes() == A
    assert swap.read_record(work) is None
    assert not h.exit_requested.is_set()
    assert b"failed" in h.records[-1]


@need_dpkg_deb
def test_deb_not_installed_by_dpkg_swaps_the_file(tmp_path: Path) -> None:
    work = setup_work(tmp_path)
    deb = make_deb(tmp_path / "b.deb", B).read_bytes()
    h = Harness(work, fake_dpkg_env(tmp_path, work, owned=False))
    with http_files({"/b.deb": deb}) as base:
        asyncio.run(drive(h, spec("B", deb, base + "/b.deb"), done=h.exit_requested.is_set))
    record = swap.read_record(work)
    assert record is not None
    assert record.method == "file"
    assert (work / "elkeid-agent").read_bytes() == B
    assert not (tmp_path / "dpkg.log").exists()


@pytest.mark.skipif(shutil.which("rpmbuild") is None, reason="rpmbuild is not installed")
def test_rpm_owned_by_rpm_is_installed_with_rpm(tmp_path: Path) -> None:
    work = setup_work(tmp_path)
    rpm = make_rpm(tmp_path / "b.rpm", B).read_bytes()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "rpm").write_text(FAKE_RPM)
    (bin_dir / "rpm").chmod(0o755)
    (tmp_path / "staged").write_bytes(B)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "OWNED": "yes", "NEW": str(tmp_path / "staged"),
           "TARGET": str(work / "elkeid-agent"), "RPM_LOG": str(tmp_path / "rpm.log")}
    h = Harness(work, env)
    with http_files({"/b.rpm": rpm}) as base:
        asyncio.run(drive(h, spec("B", rpm, base + "/b.rpm"), done=h.exit_requested.is_set))
    record = swap.read_record(work)
    assert record is not None
    assert record.method == "rpm"
    assert (tmp_path / "rpm.log").read_text().strip().endswith("/candidate.rpm")
    assert (work / "elkeid-agent.prev").read_bytes() == A


def test_one_attempt_at_a_time_and_the_latest_wish_wins(tmp_path: Path) -> None:
    work = setup_work(tmp_path)
    hits: list[str] = []
    c = answering("C")
    h = Harness(work, probe_timeout=1.0)
    attempt_dirs: list[int] = []

    async def scenario(base: str) -> None:
        async with asyncio.TaskGroup() as tg:
            runner = tg.create_task(h.manager.run())
            await h.manager.consider(spec("B", HANG, base + "/b"))
            await until(lambda: h.manager.state == "probing")
            # While B is being probed, the server changes its mind twice: only the last
            # wish is tried, and only after B's attempt has ended.
            await h.manager.consider(spec("X", b"x", base + "/x"))
            await h.manager.consider(spec("C", c, base + "/c"))
            while not h.exit_requested.is_set():
                attempt_dirs.append(len(list((work / "tmp").glob("upgrade-*"))))
                await asyncio.sleep(0.01)
            runner.cancel()

    with http_files({"/b": HANG, "/c": c, "/x": b"x"}, hits=hits) as base:
        asyncio.run(scenario(base))
    assert hits == ["/b", "/c"]
    assert max(attempt_dirs) == 1
    assert (work / "elkeid-agent").read_bytes() == c
    assert b"did not finish within 1 s" in h.records[0]


def test_an_archive_over_a_cap_is_refused_by_name_and_counted(tmp_path: Path) -> None:
    work = setup_work(tmp_path)
    bomb = long_name_bomb_tar_gz(16 * 1024 * 1024)
    h = Harness(work)
    with http_files({"/bomb.tar.gz": bomb}) as base:
        asyncio.run(drive(h, spec("B", bomb, f"{base}/bomb.tar.gz"),
                          done=lambda: h.manager.last_error))
    assert "GNU long name header declares 16777216 bytes" in h.manager.last_error
    assert h.counted == ["archive_header_cap"]
    assert (work / "elkeid-agent").read_bytes() == A


def test_refusals_are_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    work = setup_work(tmp_path)
    swap.write_quarantine(work, swap.read_quarantine(work).add("B", time.time() + 100,
                                                               time.time()))
    h = Harness(work)

    async def scenario() -> None:
        for _ in range(5):
            await h.manager.consider(spec("B", B, "http://127.0.0.1:9/b"))

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert sum("ignored: quarantined" in r.getMessage() for r in caplog.records) == 1
    assert not h.manager._wake.is_set()


def test_no_new_attempt_while_unconfirmed_then_the_bound_rolls_back(tmp_path: Path) -> None:
    work = setup_work(tmp_path)
    (work / "elkeid-agent.prev").write_bytes(A)
    (work / "elkeid-agent").write_bytes(B)
    record = UpgradeRecord(from_version="Z", to_version="A", started_at=time.time(),
                           target=str(work / "elkeid-agent"),
                           prev=str(work / "elkeid-agent.prev"))
    swap.write_record(work, record)
    start = check_pending_upgrade(work, "A")
    assert start.state is UpgradeState.SWAPPED
    h = Harness(work, startup=start, confirm_bound=1.0)

    async def scenario() -> None:
        await h.manager.consider(spec("C", B, "http://127.0.0.1:9/c"))
        assert not h.manager._wake.is_set()
        await drive(h, done=h.exit_requested.is_set)

    asyncio.run(scenario())
    assert h.manager.state == "quarantined"
    assert "did not reach the server within 1 s" in h.errors["upgrade"]
    assert (work / "elkeid-agent").read_bytes() == A
    assert "A" in swap.read_quarantine(work).versions


def test_confirm_removes_the_record_once(tmp_path: Path) -> None:
    work = setup_work(tmp_path)
    swap.write_record(work, UpgradeRecord(from_version="Z", to_version="A",
                                          started_at=time.time(),
                                          target=str(work / "elkeid-agent"),
                                          prev=str(work / "elkeid-agent.prev")))
    h = Harness(work, startup=check_pending_upgrade(work, "A"))
    h.manager.confirm()
    h.manager.confirm()
    assert h.manager.state == "confirmed"
    assert swap.read_record(work) is None
    assert len(h.records) == 1
    assert b"upgraded from Z to A" in h.records[0]


def test_start_up_with_a_corrupt_record_and_a_killed_attempt(tmp_path: Path) -> None:
    work = setup_work(tmp_path)
    (work / "upgrade.json").write_text("{not json")
    (work / "tmp" / "upgrade-x1y2z3").mkdir()
    (work / "tmp" / "upgrade-x1y2z3" / ".download-abc").write_bytes(b"partial")
    (work / "tmp" / "_MEI12345").mkdir()
    start = check_pending_upgrade(work, "A")
    assert (start.exit, start.state) == (False, UpgradeState.IDLE)
    assert "corrupt upgrade record" in start.error
    assert not (work / "upgrade.json").exists()
    assert [p.name for p in (work / "tmp").iterdir()] == ["_MEI12345"]  # not ours to clean


def test_start_up_rollback_without_the_saved_executable_keeps_running(tmp_path: Path) -> None:
    work = setup_work(tmp_path)
    swap.write_record(work, UpgradeRecord(from_version="Z", to_version="A",
                                          started_at=time.time() - 3600,
                                          target=str(work / "elkeid-agent"),
                                          prev=str(work / "elkeid-agent.prev")))
    start = check_pending_upgrade(work, "A")
    assert start.exit is False
    assert "rollback failed" in start.error
    assert (work / "elkeid-agent").read_bytes() == A
    assert swap.read_record(work) is None


def test_start_up_counts_starts_in_the_record(tmp_path: Path) -> None:
    work = setup_work(tmp_path)
    (work / "elkeid-agent.prev").write_bytes(b"#!/bin/sh\necho Z\n")
    swap.write_record(work, UpgradeRecord(from_version="Z", to_version="A",
                                          started_at=time.time(),
                                          target=str(work / "elkeid-agent"),
                                          prev=str(work / "elkeid-agent.prev")))
    for expected in (1, 2, 3):
        assert check_pending_upgrade(work, "A").exit is False
        assert json.loads((work / "upgrade.json").read_text())["starts_without_confirm"] == (
            expected)
    start = check_pending_upgrade(work, "A")
    assert start.exit is True
    assert (work / "elkeid-agent").read_bytes() == b"#!/bin/sh\necho Z\n"


def test_a_wall_clock_step_does_not_roll_back_a_good_version(tmp_path: Path) -> None:
    """Within one boot the bound runs on CLOCK_BOOTTIME: a record whose wall-clock start
    looks a day old (an NTP step) but that this boot's clock says is 2 s old is kept, at the
    start-up check and in the running agent; the swap's record carries both clocks."""
    work = setup_work(tmp_path)
    boot = boot_time()
    assert boot is not None
    record = UpgradeRecord(from_version="Z", to_version="A", started_at=time.time() - 86_400,
                           boot_id=boot.boot_id, started_boottime=boot.seconds - 2,
                           target=str(work / "elkeid-agent"),
                           prev=str(work / "elkeid-agent.prev"))
    swap.write_record(work, record)
    start = check_pending_upgrade(work, "A")
    assert start.state is UpgradeState.SWAPPED
    h = Harness(work, startup=start, confirm_bound=600.0)
    left = h.manager._bound_left()
    assert left is not None
    assert 590 < left <= 598


def test_the_swap_record_names_this_boot(tmp_path: Path) -> None:
    work = setup_work(tmp_path)
    with http_files({"/b": B}) as base:
        h = Harness(work)
        asyncio.run(drive(h, spec("B", B, base + "/b"), done=h.exit_requested.is_set))
    record = swap.read_record(work)
    assert record is not None
    boot = boot_time()
    assert boot is not None
    assert record.boot_id == boot.boot_id
    assert 0 <= boot.seconds - record.started_boottime < 60


def test_an_attempt_on_a_work_dir_it_cannot_write_fails_and_the_agent_runs_on(
    tmp_path: Path,
) -> None:
    # What a full or read-only disk does to the attempt's directory: an OSError, which ends
    # the attempt (reported), not the upgrade task and with it the agent.
    work = tmp_path / "work"
    work.mkdir()
    (work / "tmp").write_bytes(b"not a directory")

    async def main() -> None:
        h = Harness(work)
        await drive(h, spec("B", b"B", "http://127.0.0.1:9/B"), done=lambda: h.manager.last_error)
        assert "failed" in h.manager.last_error
        assert h.records  # the 5100 saying so

    asyncio.run(main())
