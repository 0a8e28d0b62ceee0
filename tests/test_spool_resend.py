"""Issue 19, finding 0: whatever was written on a stream that ends abnormally is sent again.

A real agent drains a spooled backlog to the real local center over mTLS; the center's gRPC
server is stopped mid-drain (every stream cut, whatever it held unread is gone) and started
again. Every record must arrive; duplicates stay within the trail's bound.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from agentproc import AgentProcess
from conftest import AgentConfig
from spooltools import FAST, last_heartbeat

from elkeid_agent.spool import format as fmt
from elkeid_agent.wire import MAX_MESSAGE_BYTES, encode_record, splice_records
from elkeid_center.testing import CenterThread


def _prefill(spool: Path, total: int, per_entry: int) -> int:
    spool.mkdir(parents=True)
    pad = "p" * 240
    records: list[bytes] = []
    with (spool / fmt.segment_name(1)).open("wb") as out:
        for start in range(0, total, per_entry):
            records = [
                encode_record(9999, 1, {"run": "old", "seq": str(i), "pad": pad})
                for i in range(start, start + per_entry)
            ]
            out.write(fmt.encode_entry(2, per_entry, 1, splice_records(records, b"")))
    return len(records[0])


@pytest.mark.parametrize("cuts", [1, 3])
def test_a_stream_cut_while_draining_loses_nothing(
    center: CenterThread, agent_config: AgentConfig, cuts: int
) -> None:
    config = agent_config(transport=FAST)
    spool = Path(str(config).replace(".toml", "-work")) / "spool"
    total = 120_000
    record_bytes = _prefill(spool, total, 1000)
    with AgentProcess(config) as agent:
        for k in range(cuts):
            mark = total * (k + 1) // (cuts + 2)
            center.wait_for(lambda m=mark: len(center.records(9999)) > m, timeout=60)
            center.stop()
            time.sleep(0.3)
            center.start()
        center.wait_for(
            lambda: last_heartbeat(center).get("spool_records") == "0"
            and len({r.fields["seq"] for r in center.records(9999)}) >= total,
            timeout=60,
        )
        assert agent.stop() == 0
    seqs = [r.fields["seq"] for r in center.records(9999)]
    duplicates = len(seqs) - len(set(seqs))
    missing = total - len(set(seqs))
    print(f"{cuts} cut(s) while draining: {duplicates} duplicates, {missing} missing")
    assert missing == 0
    # Each cut sends again at most the trail and the message under way.
    assert duplicates <= cuts * MAX_MESSAGE_BYTES // record_bytes
