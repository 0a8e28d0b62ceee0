"""Atomic replacement, and SIGKILL at random instants of the real swap and rollback code:
the target is always the old or the new executable, whole, and the record always lets the
next start finish the job."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from elkeid_agent.upgrade import swap
from elkeid_agent.upgrade.manager import check_pending_upgrade
from elkeid_agent.upgrade.record import UpgradeRecord
from elkeid_agent.upgrade.state import UpgradeState

REPO = Path(__file__).resolve().parents[2]
SIZE = 24 * 1024 * 1024  # about the frozen executable's size
A = b"A" * SIZE
B = b"B" * SIZE

SWAP_CHILD = """
import asyncio, sys
from pathlib import Path
from elkeid_agent.commands import ConfigSpec
from elkeid_agent.upgrade.manager import StartupResult, UpgradeManager
from elkeid_agent.upgrade.state import Event, UpgradeState

work = Path(sys.argv[1])

async def main() -> None:
    m = UpgradeManager(work, emit=lambda r: None, errors={}, request_exit=lambda: None,
                       startup=StartupResult(False, UpgradeState.IDLE), env={}, version="A")
    m.machine.handle(Event.START)
    await m._file_swap(ConfigSpec(name="elkeid-agent", version="B"), work / "tmp" / "cand")

asyncio.run(main())
print("done", flush=True)
"""

ROLLBACK_CHILD = """
import sys
from pathlib import Path
from elkeid_agent.upgrade.manager import check_pending_upgrade
print(check_pending_upgrade(Path(sys.argv[1]), "B").exit, flush=True)
"""


def test_copy_atomic_replaces_content_and_mode(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.write_bytes(b"new")
    dest.write_bytes(b"old")
    (tmp_path / ".dest.new").write_bytes(b"leftover of a killed attempt")
    swap.copy_atomic(src, dest, 0o700)
    assert dest.read_bytes() == b"new"
    assert dest.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "src"]


def test_copy_atomic_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / ".dest.new").symlink_to(victim)
    src = tmp_path / "src"
    src.write_bytes(b"new")
    swap.copy_atomic(src, tmp_path / "dest", 0o700)
    assert victim.read_bytes() == b"keep"
    assert (tmp_path / "dest").read_bytes() == b"new"


def _setup(work: Path) -> None:
    (work / "tmp").mkdir(parents=True)
    (work / "elkeid-agent").write_bytes(A)
    (work / "elkeid-agent").chmod(0o700)
    (work / "tmp" / "cand").write_bytes(B)


def _run_child(
    code: str, work: Path, kill_after: float | None, kill_when: Path | None = None
) -> bool:
    """Run `code`; SIGKILL it `kill_after` seconds after it started, or after `kill_when`
    appeared (then `kill_after` is the extra delay). True if it was killed mid-way."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(work)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
    )
    if kill_when is not None:
        while not kill_when.exists() and proc.poll() is None:
            time.sleep(0.0005)
    if kill_after is not None:
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
    code_ = proc.wait(60)
    return code_ == -signal.SIGKILL


def _measure(code: str, prepare: object, tmp_path: Path) -> float:
    work = tmp_path / "measure"
    prepare(work)  # type: ignore[operator]
    started = time.monotonic()
    assert not _run_child(code, work, None)
    return time.monotonic() - started


def _check_after_swap_kill(work: Path) -> str:
    content = (work / "elkeid-agent").read_bytes()
    assert content in (A, B), "partial target"
    record = swap.read_record(work)
    if content == B:
        # The new executable is in place: it must find the record and the saved A.
        assert record is not None
        assert record.to_version == "B"
        assert (work / "elkeid-agent.prev").read_bytes() == A
        return "B"
    # The old one starts again: a record, if any, says the swap did not happen.
    assert check_pending_upgrade(work, "A").exit is False
    assert swap.read_record(work) is None
    return "A"


def test_sigkill_during_the_swap_never_leaves_a_partial_target(tmp_path: Path) -> None:
    duration = _measure(SWAP_CHILD, _setup, tmp_path)
    rng = random.Random(6)
    for i in range(15):
        work = tmp_path / f"w{i}"
        _setup(work)
        _run_child(SWAP_CHILD, work, rng.uniform(0, duration * 1.2))
        _check_after_swap_kill(work)
    # Aimed at the narrow window: once the staging copy of the target exists, kill within
    # the next few milliseconds (during the copy, around the fsync, around the rename).
    during_copy = 0
    for i in range(15):
        work = tmp_path / f"aimed{i}"
        _setup(work)
        staging = work / ".elkeid-agent.new"
        killed = _run_child(SWAP_CHILD, work, rng.uniform(0, 0.03), kill_when=staging)
        outcome = _check_after_swap_kill(work)
        during_copy += killed and outcome == "A" and staging.exists()
    assert during_copy > 0, "no kill landed while the new executable was being written"


def _setup_rollback(work: Path) -> None:
    work.mkdir(parents=True)
    (work / "elkeid-agent").write_bytes(B)
    (work / "elkeid-agent.prev").write_bytes(A)
    swap.write_record(work, UpgradeRecord(
        from_version="A", to_version="B", started_at=time.time(), starts_without_confirm=3,
        target=str(work / "elkeid-agent"), prev=str(work / "elkeid-agent.prev"),
    ))


@pytest.mark.parametrize("seed", [1])
def test_sigkill_during_the_rollback_is_finished_by_the_next_start(
    tmp_path: Path, seed: int
) -> None:
    duration = _measure(ROLLBACK_CHILD, _setup_rollback, tmp_path)
    rng = random.Random(seed)
    for i in range(20):
        work = tmp_path / f"w{i}"
        _setup_rollback(work)
        _run_child(ROLLBACK_CHILD, work, rng.uniform(0, duration * 1.2))
        content = (work / "elkeid-agent").read_bytes()
        assert content in (A, B), f"partial target after kill {i}"
        # Whatever started next (B again, or A) ends with A in place and B quarantined.
        start = check_pending_upgrade(work, "B" if content == B else "A")
        if content == B:
            assert start.exit is True
            assert start.state is UpgradeState.ROLLED_BACK
            start = check_pending_upgrade(work, "A")
        assert start.state is UpgradeState.QUARANTINED
        assert (work / "elkeid-agent").read_bytes() == A
        assert "B" in swap.read_quarantine(work).versions
