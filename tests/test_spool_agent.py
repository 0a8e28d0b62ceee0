"""The spool through the real agent process and the local center: outages, restarts, bounds,
damaged spool files, and no disk writes while connected."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agentproc import AgentProcess, wait_until
from conftest import AgentConfig
from spooltools import FAST, last_heartbeat, numbered_plugin, produced, tally

from elkeid_agent.spool import format as fmt
from elkeid_agent.wire import MAX_MESSAGE_BYTES, encode_record, splice_records
from elkeid_center.testing import CenterThread

RATE = 2000


def _segments(work: Path) -> list[Path]:
    return sorted((work / "spool").glob("*.seg"))


def _stop_plugins_and_settle(center: CenterThread, counts: Path, timeout: float = 60) -> None:
    """A set without the plugin stops it (its last count saved); wait for the last record."""
    # An empty Configs command means nothing to the agent; a set naming only a plugin that
    # cannot be installed removes ours.
    others = [{"name": "absent", "version": "1", "sha256": "0" * 64}]
    center.set_configs(others)
    center.send_configs(others)
    last = (-1, -1)

    def settled() -> bool:
        nonlocal last
        t = tally(center, counts)
        now = (t.delivered, t.produced)
        done = now == last
        last = now
        return done

    wait_until(settled, timeout, interval=2.0)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_restart_during_an_outage(
    center: CenterThread, agent_config: AgentConfig, tmp_path: Path, sig: signal.Signals
) -> None:
    counts = tmp_path / "counts"
    center.set_configs([numbered_plugin(center, tmp_path / "files", counts, RATE)])
    config = agent_config(transport=FAST)
    work = Path(str(config).replace(".toml", "-work"))
    with AgentProcess(config) as agent:
        center.wait_for(lambda: len(center.records(9999)) > RATE, timeout=30)
        # Connected and keeping up: the spool is never written.
        time.sleep(1.5)
        assert _segments(work) == []
        assert last_heartbeat(center)["spool_written_bytes"] == "0"
        center.stop()
        time.sleep(3)
        agent.signal(sig)
        agent.wait(30)
    runs_before = set(produced(counts))
    with AgentProcess(config) as agent:
        started = time.monotonic()
        # No server reachable: the persisted set starts the plugin from its installed executable.
        wait_until(lambda: set(produced(counts)) - runs_before, 15)
        plugin_after = time.monotonic() - started
        time.sleep(3)
        # `ctl status` shows the backlog (from the status file of the last heartbeat).
        status = subprocess.run(
            [sys.executable, "-m", "elkeid_agent", "ctl", "--work-dir", str(work), "status"],
            env=agent.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,  # exit 3: no service manager here; the output is what counts
        ).stdout
        assert "spool: holding, " in status, status
        center.start()
        _stop_plugins_and_settle(center, counts)
        result = tally(center, counts)
        beat = last_heartbeat(center)
        assert agent.stop() == 0
    print(f"{sig.name}: {result}, lost {result.lost}, plugin again after {plugin_after:.1f} s")
    assert plugin_after < 5.0
    # Records of one message (8 MiB, some 30,000 of these) at most may arrive twice.
    assert result.duplicates <= 8 * 1024 * 1024 // 260
    if sig is signal.SIGTERM:
        assert result.lost == 0
    else:
        # What the dead agent had not yet handed to the spool, and what sat in its pipes.
        assert result.lost <= RATE * 1.5
    assert beat["spool_records"] == "0"
    assert beat["spool_state"] == "empty"


def test_at_the_bound_drops_are_counted_exactly(
    center: CenterThread, agent_config: AgentConfig, tmp_path: Path
) -> None:
    counts = tmp_path / "counts"
    center.set_configs([numbered_plugin(center, tmp_path / "files", counts, 5000)])
    config = agent_config(transport=FAST, spool={"max_bytes": 1024 * 1024, "min_free_bytes": 0})
    with AgentProcess(config) as agent:
        center.wait_for(lambda: len(center.records(9999)) > 1000, timeout=30)
        center.stop()
        time.sleep(5)  # ~6 MB of records into a 1 MiB spool
        center.start()
        _stop_plugins_and_settle(center, counts)
        time.sleep(1.5)  # a heartbeat after the last record
        result = tally(center, counts)
        beat = last_heartbeat(center)
        assert agent.stop() == 0
    dropped = int(beat["spool_dropped_records"])
    perhaps = int(beat["spool_dropped_resent_records"])
    print(f"lost {result.lost}, counted {dropped} + {perhaps} written once before the cut, "
          f"{result.duplicates} duplicates")
    assert dropped > 0
    # What was written on the cut stream is sent again: it may arrive twice, or, dropped at
    # the bound, be missing or not (no acknowledgements); it is counted apart.
    assert result.lost - perhaps <= dropped <= result.lost
    assert result.duplicates <= MAX_MESSAGE_BYTES // 250
    assert int(beat["spool_dropped_bytes"]) > 0


def test_damaged_spool_files_are_counted_and_the_rest_delivered(
    center: CenterThread, agent_config: AgentConfig, tmp_path: Path
) -> None:
    config = agent_config(transport=FAST)
    spool = Path(str(config).replace(".toml", "-work")) / "spool"
    spool.mkdir(parents=True)

    def entry(seq: int) -> bytes:
        record = encode_record(9999, 1, {"run": "old", "seq": str(seq)})
        return fmt.encode_entry(2, 1, int(time.time()), splice_records([record], b""))

    torn = entry(0) + entry(1) + entry(2)[:-3]
    flipped = bytearray(entry(3) + entry(4) + entry(5))
    flipped[len(entry(3)) + 30] ^= 0x01
    (spool / fmt.segment_name(1)).write_bytes(torn)
    (spool / fmt.segment_name(2)).write_bytes(b"")
    (spool / fmt.segment_name(3)).write_bytes(bytes(flipped))
    with AgentProcess(config) as agent:
        center.wait_for(lambda: len(center.records(9999)) >= 4, timeout=30)
        center.wait_for(lambda: last_heartbeat(center).get("spool_corrupt_entries") == "2", 10)
        assert agent.stop() == 0
    assert sorted(int(r.fields["seq"]) for r in center.records(9999)) == [0, 1, 3, 5]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_restart_while_draining(
    center: CenterThread, agent_config: AgentConfig, tmp_path: Path, sig: signal.Signals
) -> None:
    config = agent_config(transport=FAST)
    spool = Path(str(config).replace(".toml", "-work")) / "spool"
    spool.mkdir(parents=True)
    total, per_entry = 120_000, 1000
    pad = "p" * 240
    with (spool / fmt.segment_name(1)).open("wb") as out:
        for start in range(0, total, per_entry):
            records = [
                encode_record(9999, 1, {"run": "old", "seq": str(i), "pad": pad})
                for i in range(start, start + per_entry)
            ]
            out.write(fmt.encode_entry(2, per_entry, 1, splice_records(records, b"")))
    record_bytes = len(records[0])
    with AgentProcess(config) as agent:
        # Stopped once part of the backlog has arrived, in the middle of sending the rest.
        center.wait_for(lambda: len(center.records(9999)) > total // 4, timeout=60)
        agent.signal(sig)
        assert agent.wait(30) == (0 if sig is signal.SIGTERM else -signal.SIGKILL)
    with AgentProcess(config) as agent:
        center.wait_for(
            lambda: last_heartbeat(center).get("spool_records") == "0"
            and len(center.records(9999)) >= total // 2,
            timeout=120,
        )
        time.sleep(1)
        assert agent.stop() == 0
    seqs = [r.fields["seq"] for r in center.records(9999)]
    duplicates = len(seqs) - len(set(seqs))
    missing = total - len(set(seqs))
    print(f"{sig.name} while draining: {duplicates} duplicates, {missing} missing")
    # The checkpoint trails by TRAIL_BYTES of small messages, more than the center holds
    # written but unread; with the message being written, one full message's worth at most.
    assert duplicates <= MAX_MESSAGE_BYTES // record_bytes
    # Nothing lost: after SIGTERM the server ending the half-closed stream proved it read
    # every message; after SIGKILL the trail covered what it still held unread.
    assert missing == 0
