"""The upgrade guard (`elkeid-agent upgrade-guard`), as the unit's ExecStartPre runs it: a
real process from the source tree over real files. It counts the starts of a pending
upgrade, rolls back after `max_unconfirmed_starts`, and never fails a start."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from elkeid_agent.config import UpgradeConfig
from elkeid_agent.upgrade import swap
from elkeid_agent.upgrade.guard import guard
from elkeid_agent.upgrade.record import UpgradeRecord, Verdict

REPO = Path(__file__).resolve().parents[2]
OLD = b"#!/bin/sh\necho A\n"
NEW = b"#!/bin/sh\nexit 1\n"


def pending(tmp_path: Path, max_starts: int = 3) -> tuple[Path, Path]:
    work = tmp_path / "work"
    work.mkdir()
    target, prev = work / "elkeid-agent", work / "elkeid-agent.prev"
    target.write_bytes(NEW)
    prev.write_bytes(OLD)
    target.chmod(0o755)
    prev.chmod(0o700)
    swap.write_record(work, UpgradeRecord(
        from_version="A", to_version="B", started_at=time.time(), target=str(target),
        prev=str(prev), method="dpkg",
    ))
    config = tmp_path / "agent.toml"
    config.write_text(f'work_dir = "{work}"\n[upgrade]\nmax_unconfirmed_starts = {max_starts}\n')
    return work, config


def run_guard(config: Path, invocation: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "elkeid_agent", "upgrade-guard", "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
        env={"PATH": "/usr/bin:/bin", "INVOCATION_ID": invocation},
    )


def test_guard_counts_starts_and_restores_the_previous_executable(tmp_path: Path) -> None:
    work, config = pending(tmp_path, max_starts=2)
    outputs = [run_guard(config, f"start-{n}") for n in range(3)]
    assert [o.returncode for o in outputs] == [0, 0, 0]
    assert "start 1 of 2 without confirmation" in outputs[0].stderr
    assert "start 2 of 2 without confirmation" in outputs[1].stderr
    # The third start: A is back before it runs.
    assert "upgrade from A to B rolled back: B started 2 times" in outputs[2].stderr
    assert "the dpkg database still lists B; the executable is A" in outputs[2].stderr
    assert (work / "elkeid-agent").read_bytes() == OLD
    assert (work / "elkeid-agent").stat().st_mode & 0o777 == 0o755  # the target's mode kept
    record = json.loads((work / "upgrade.json").read_text())
    assert (record["phase"], record["guard_starts"]) == ("rolled_back", 3)
    assert "counted by the upgrade guard" in record["reason"]
    assert json.loads((work / "upgrade-quarantine.json").read_text())["versions"]["B"] > (
        time.time() + 23 * 3600)
    outcome = json.loads((work / "upgrade-last.json").read_text())
    assert (outcome["result"], outcome["from_version"], outcome["to_version"]) == (
        "rolled_back", "A", "B")
    # The rolled-back record is A's to report: more runs of the guard change nothing.
    assert run_guard(config, "start-4").returncode == 0
    assert json.loads((work / "upgrade.json").read_text()) == record


def test_one_start_is_counted_once(tmp_path: Path) -> None:
    work, _ = pending(tmp_path)
    assert guard(work, UpgradeConfig(), "same") is Verdict.AWAIT_CONFIRM
    assert guard(work, UpgradeConfig(), "same") is Verdict.NONE
    assert json.loads((work / "upgrade.json").read_text())["guard_starts"] == 1


def test_guard_never_fails_the_start(tmp_path: Path) -> None:
    work, config = pending(tmp_path)
    (work / "upgrade.json").write_text("{not json")
    out = run_guard(config, "x")
    assert out.returncode == 0
    assert "upgrade.json" in out.stderr
    # No work dir at all, a config it cannot read: still 0.
    missing = subprocess.run(
        [sys.executable, "-m", "elkeid_agent", "upgrade-guard", "--config",
         str(tmp_path / "nope.toml")],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )
    assert missing.returncode == 0
    assert "config refused" in missing.stderr


def test_a_config_the_guard_refuses_still_names_the_work_dir(tmp_path: Path) -> None:
    work, config = pending(tmp_path)
    # A key this version does not know: the strict config is refused, work_dir still read.
    config.write_text(f'work_dir = "{work}"\nnot_a_key = 1\n')
    out = run_guard(config, "x")
    assert out.returncode == 0
    assert "config refused" in out.stderr
    assert "start 1 of 3" in out.stderr
    assert json.loads((work / "upgrade.json").read_text())["guard_starts"] == 1


def test_no_record_no_work(tmp_path: Path) -> None:
    work, config = pending(tmp_path)
    (work / "upgrade.json").unlink()
    out = run_guard(config, "x")
    assert out.returncode == 0
    assert "start" not in out.stderr
    assert "rolled back" not in out.stderr
    assert not (work / "upgrade.json").exists()
    assert (work / "elkeid-agent").read_bytes() == NEW


def ctl_status(work: Path) -> str:
    return subprocess.run(
        [sys.executable, "-m", "elkeid_agent", "ctl", "--work-dir", str(work), "status"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    ).stdout


def test_ctl_status_says_what_is_pending_rolled_back_and_quarantined(tmp_path: Path) -> None:
    work, config = pending(tmp_path, max_starts=1)
    assert run_guard(config, "1").returncode == 0
    status = ctl_status(work)
    assert "upgrade pending: A -> B (dpkg), 1 start(s) without confirmation" in status
    assert run_guard(config, "2").returncode == 0  # out of starts: rolled back
    status = ctl_status(work)
    assert "upgrade rolling back: A <- B: B started 1 times" in status
    assert "last upgrade: B rolled back to A " in status
    assert "counted by the upgrade guard" in status
    assert "quarantined: B until " in status
    # Corrupt files are named, not a traceback.
    (work / "upgrade-last.json").write_text("[")
    assert "upgrade files: upgrade-last.json" in ctl_status(work)


def test_a_forged_record_copies_nothing_but_the_fixed_files(tmp_path: Path) -> None:
    """upgrade.json may be written by someone else: its `prev` and `target` name any file.
    The guard restores `<work_dir>/elkeid-agent.prev` over `<work_dir>/elkeid-agent`, and
    nothing else is read or written."""
    work, config = pending(tmp_path, max_starts=1)
    secret, victim = tmp_path / "secret", tmp_path / "victim"
    secret.write_bytes(b"root's secret\n")
    victim.write_bytes(b"a system file\n")
    forged = json.loads((work / "upgrade.json").read_text())
    forged.update(prev=str(secret), target=str(victim))
    (work / "upgrade.json").write_text(json.dumps(forged))
    for n in range(2):
        assert run_guard(config, f"start-{n}").returncode == 0
    assert json.loads((work / "upgrade.json").read_text())["phase"] == "rolled_back"
    assert victim.read_bytes() == b"a system file\n"
    assert secret.read_bytes() == b"root's secret\n"
    assert (work / "elkeid-agent").read_bytes() == OLD  # the fixed pair, whatever it says


def test_a_symlinked_previous_executable_is_not_followed(tmp_path: Path) -> None:
    work, _ = pending(tmp_path, max_starts=1)
    secret = tmp_path / "secret"
    secret.write_bytes(b"root's secret\n")
    (work / "elkeid-agent.prev").unlink()
    (work / "elkeid-agent.prev").symlink_to(secret)
    assert guard(work, UpgradeConfig(max_unconfirmed_starts=1), "s1") is Verdict.AWAIT_CONFIRM
    with pytest.raises(OSError, match="not a regular file"):
        guard(work, UpgradeConfig(max_unconfirmed_starts=1), "s2")
    assert (work / "elkeid-agent").read_bytes() == NEW
