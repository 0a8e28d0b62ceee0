"""The real agent process on a work dir that fills up or turns read-only, against the center.

Each fault is one file write's: the agent keeps its PID, its stream and its heartbeats, reports
`abnormal` with a state_detail naming the path and errno, and returns to `running` by itself
once the disk takes writes again.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
from agentproc import AgentProcess, patch_config, wait_until
from diskfaults import fill, read_only, tmpfs

from elkeid_agent import specified_env
from elkeid_agent.health import Health
from elkeid_agent.plugins import orphans
from elkeid_agent.status import AgentStatus, read_status, write_status
from elkeid_agent.version import PRODUCT
from elkeid_center.testing import CenterThread

FAST = {"heartbeat_interval": 0.3, "dial_timeout": 1.0, "backoff_initial": 0.2,
        "backoff_max": 2.0}


def config_for(center: CenterThread, tmp_path: Path, work_dir: Path) -> Path:
    path = center.write_agent_config(tmp_path / "agent.toml", work_dir)
    return patch_config(path, transport=FAST)


def beats(center: CenterThread) -> int:
    return len(center.records(1000))


def beat_after(center: CenterThread, since: int, want: str, *needles: str) -> dict[str, str]:
    """The first heartbeat after the `since`-th in state `want` whose detail has `needles`."""

    def find() -> dict[str, str] | None:
        for record in center.records(1000)[since:]:
            fields = dict(record.fields)
            if fields["state"] == want and all(n in fields["state_detail"] for n in needles):
                return fields
        return None

    try:
        found: dict[str, str] = center.wait_for(find, timeout=20)
    except TimeoutError:
        last = center.records(1000)[-1:]
        raise AssertionError(f"no {want} heartbeat with {needles}; last: "
                             f"{last and last[0].fields['state_detail']}") from None
    return found


def details(fields: dict[str, str]) -> list[str]:
    value: list[str] = json.loads(fields["state_detail"])
    return value


def test_full_disk_is_reported_and_recovers_without_a_restart(
    center: CenterThread, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "fs", "8m") as fs:
        work = fs / "work"
        with AgentProcess(config_for(center, tmp_path, work)) as agent:
            beat_after(center, 0, "running")
            filler = fill(fs)
            full_at = beats(center)
            faulty = beat_after(center, full_at, "abnormal", "status.json", "ENOSPC")
            assert int(faulty["pid"]) == agent.pid
            (status_fault,) = [d for d in details(faulty) if d.startswith("status file")]
            assert status_fault == (
                f"status file: cannot write: {work / 'status.json'}: "
                "ENOSPC (No space left on device)"
            )
            assert int(faulty["status_write_failures"]) >= 1
            # The stream and the heartbeats go on while the disk stays full.
            center.wait_records(1000, count=beats(center) + 3, timeout=10)
            assert agent.proc is not None
            assert agent.proc.poll() is None
            assert len(center.connections()) == 1  # never reconnected, never restarted

            filler.unlink()
            freed_at = beats(center)
            healthy = beat_after(center, freed_at, "running")
            assert details(healthy) == []
            assert int(healthy["pid"]) == agent.pid
            status = read_status(work)
            assert status is not None
            assert status.pid == agent.pid
            assert status.state == "running"
            # The log takes lines again (and says what it could not write meanwhile).
            wait_until(lambda: "status file: recovered" in agent.log(), timeout=10)
            assert int(healthy["log_write_failures"]) == 0 or "were not written" in agent.log()
            assert agent.stop() == 0


def test_read_only_remount_is_reported_and_recovers(
    center: CenterThread, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    with AgentProcess(config_for(center, tmp_path, work)) as agent:
        beat_after(center, 0, "running")
        with read_only(work):
            ro_at = beats(center)
            faulty = beat_after(center, ro_at, "abnormal", "status.json", "EROFS")
            assert int(faulty["pid"]) == agent.pid
            # A 1051 that cannot be persisted fails as that task, with the reason.
            center.send_task(1051, PRODUCT, {"idc": "dc-ro"}, "ro-1051")
            (result,) = center.wait_records(5100, timeout=10)
            assert result.fields["status"] == "failed"
            assert f"{work / 'specified_env'}: EROFS" in result.fields["msg"]
            beat_after(center, ro_at, "abnormal", "specified_env file: cannot write")
        # The status file clears by itself; specified_env at the next 1051 that succeeds.
        center.send_task(1051, PRODUCT, {"idc": "dc-rw"}, "rw-1051")
        center.wait_records(5100, count=2, timeout=10)
        rw_at = beats(center)
        healthy = beat_after(center, rw_at, "running")
        assert int(healthy["pid"]) == agent.pid
        assert healthy["idc"] == "dc-rw"
        assert len(center.connections()) == 1
        assert agent.stop() == 0


def test_read_only_work_dir_at_start_still_connects_and_heartbeats(
    center: CenterThread, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    agent = AgentProcess(config_for(center, tmp_path, work))
    with contextlib.ExitStack() as stack:
        with read_only(work):
            stack.enter_context(agent)  # started on the read-only work dir, killed at the end
            faulty = beat_after(center, 0, "abnormal", "EROFS")
            assert int(faulty["pid"]) == agent.pid
            text = "\n".join(details(faulty))
            assert f"work dir: cannot create: {work / 'plugin'}: EROFS" in text
            assert f"machine-id file: cannot save: {work / 'machine-id'}: EROFS" in text
            assert f"status file: cannot write: {work / 'status.json'}: EROFS" in text
            assert f"log file: cannot write: {work / 'log'}: EROFS" in text
            # The id that could not be saved is still this run's id.
            agent_id = center.connections()[0].agent_id
            assert agent_id
            ro_until = beats(center)
        # Writable again (the agent kept running): what it could not write, it writes now.
        healthy = beat_after(center, ro_until, "running")
        assert int(healthy["pid"]) == agent.pid
        assert (work / "machine-id").read_text() == agent_id
        assert (work / "plugin").is_dir()
        assert "log file writable again" in agent.log()
        assert agent.stop() == 0


def test_each_file_fails_alone_and_clears_on_the_next_write(tmp_path: Path) -> None:
    """The writers' own contract, on a real read-only mount: old content kept, fault named."""
    work = tmp_path / "work"
    (work / "plugin").mkdir(parents=True)
    status = AgentStatus(pid=1, version="v", state="running", net_mode="private",
                         connected=True, server="s", last_heartbeat=0.0, updated=0.0)
    write_status(work, status)
    specified_env.write(work, {"specified_idc": "one"})
    groups = work / "plugin" / orphans.PGIDS_FILE
    record = orphans.GroupRecord(10, 20, "boot", "/plugin/x")
    health = Health()
    assert orphans.save(groups, [record], health)
    with read_only(work):
        with pytest.raises(OSError, match="Read-only"):
            write_status(work, status)
        with pytest.raises(OSError, match="Read-only"):
            specified_env.write(work, {"specified_idc": "two"})
        assert not orphans.save(groups, [], health)
        (detail,) = health.details()
        assert detail == (
            f"plugin groups file: cannot record plugin groups: {groups}: "
            "EROFS (Read-only file system)"
        )
    assert read_status(work) == status
    assert specified_env.read(work) == {"specified_idc": "one"}
    assert orphans.load(groups) == [record]
    assert sorted(p.name for p in work.iterdir()) == ["plugin", "specified_env", "status.json"]
    assert orphans.save(groups, [], health)
    assert health.details() == []


def test_removed_work_dir_is_reported_and_made_again(
    center: CenterThread, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    with AgentProcess(config_for(center, tmp_path, work)) as agent:
        beat_after(center, 0, "running")
        shutil.rmtree(work)
        gone_at = beats(center)

        def reported() -> dict[str, str] | None:
            # Reported either way the race between the beat's files and the log's next line
            # goes: status.json refused (ENOENT), or the subdirectories found missing.
            for record in center.records(1000)[gone_at:]:
                fields = dict(record.fields)
                if (("status.json" in fields["state_detail"] and "ENOENT" in fields["state_detail"])
                        or int(fields.get("work_dirs_remade", "0")) >= 1):
                    return fields
            return None

        faulty = center.wait_for(reported, timeout=20)
        assert int(faulty["pid"]) == agent.pid
        # Made again (with its subdirectories); the log reopened.
        beat_after(center, beats(center), "running")
        assert all((work / sub).is_dir() for sub in ("plugin", "log", "tmp"))
        assert read_status(work) is not None
        wait_until(lambda: "status file: recovered" in agent.log()
                   or "missing: made again" in agent.log(), timeout=10)
        assert agent.stop() == 0


def test_full_disk_at_start_still_connects_and_heartbeats(
    center: CenterThread, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "fs", "4m") as fs:
        work = fs / "work"
        filler = fill(fs)
        with AgentProcess(config_for(center, tmp_path, work)) as agent:
            faulty = beat_after(center, 0, "abnormal", "ENOSPC")
            assert int(faulty["pid"]) == agent.pid
            filler.unlink()
            healthy = beat_after(center, beats(center), "running")
            assert int(healthy["pid"]) == agent.pid
            assert (work / "machine-id").read_text() == center.connections()[0].agent_id
            assert agent.stop() == 0
