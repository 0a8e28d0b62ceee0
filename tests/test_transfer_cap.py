"""No PackagedData over 8 MiB, even with 50 MiB queued (issue 2 acceptance).

A real TransferLoop on uvloop sends a RecordBuffer holding 50 MiB of records (sizes up to
1 MiB) over real mTLS to a local center on 127.0.0.1; the center keeps every message's raw
bytes, which must each stay under the cap and carry every record, in order, byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from pathlib import Path
from typing import Literal

import pytest
import uvloop

from elkeid_agent._proto import grpc_pb2
from elkeid_agent.buffer import RecordBuffer
from elkeid_agent.config import Config, RegionConfig, TlsConfig, TransportConfig
from elkeid_agent.spool.store import TRAIL_BYTES
from elkeid_agent.transport.stream import TransferLoop
from elkeid_agent.transport.tls import TlsMaterial
from elkeid_agent.wire import MAX_MESSAGE_BYTES, Header, decode_varint, encode_record
from elkeid_center.testing import CenterThread

MiB = 1024 * 1024
QUEUED = 50 * MiB
HEADER = Header(
    agent_id="cap-test-agent",
    intranet_ipv4=["10.0.0.5"],
    extranet_ipv4=["192.0.2.5"],
    intranet_ipv6=["fd00::5"],
    extranet_ipv6=[],
    hostname="cap-host",
    version="1.0.0",
    product="elkeid-agent",
)


def make_records(total: int, seed: int = 7) -> list[bytes]:
    """Plugin records (data_type 9999, a `seq` field) of mixed sizes up to 1 MiB."""
    rng = random.Random(seed)
    out: list[bytes] = []
    size = 0
    while size < total:
        roll = rng.random()
        if roll < 0.70:
            pad = rng.randint(100, 2_000)
        elif roll < 0.95:
            pad = rng.randint(2_000, 100_000)
        else:
            pad = rng.randint(100_000, MiB - 100)
        filler = (f"{len(out)}-" * (pad // 4 + 1))[:pad]
        fields = {"seq": str(len(out)), "pad": filler}
        record = encode_record(9999, 1_764_168_000 + len(out), fields)
        assert len(record) <= MiB
        out.append(record)
        size += len(record)
    return out


def field1_slices(message: bytes) -> tuple[list[bytes], int]:
    """The verbatim records (field 1) of a PackagedData, and where the header starts."""
    records = []
    pos = 0
    while pos < len(message):
        key, after = decode_varint(message, pos, len(message))
        if key != 0x0A:
            break
        length, start = decode_varint(message, after, len(message))
        records.append(message[start : start + length])
        pos = start + length
    return records, pos


def agent_config(
    center: CenterThread,
    work: Path,
    compression: Literal["gzip", "none"],
    send_interval: float = 0.5,
) -> Config:
    certs = center.certs
    return Config(
        work_dir=str(work),
        tls=TlsConfig(ca=str(certs.ca), cert=str(certs.client_cert), key=str(certs.client_key)),
        transport=TransportConfig(compression=compression, send_interval=send_interval),
        regions={"default": RegionConfig(private=center.address)},
    )


def start_transfer(config: Config, buffer: RecordBuffer) -> tuple[TransferLoop, asyncio.Task[None]]:
    """A real TransferLoop sending `buffer` with the HEADER, running in a task."""
    header = HEADER.encode()

    async def on_command(raw: bytes) -> None:
        grpc_pb2.Command.FromString(raw)

    loop = TransferLoop(
        config, TlsMaterial.load(config.tls), buffer, lambda: header, on_command, lambda: None
    )
    return loop, asyncio.create_task(loop.run())


async def deliver(
    center: CenterThread, config: Config, plugin: list[bytes], agent: list[bytes]
) -> RecordBuffer:
    buffer = RecordBuffer()
    await asyncio.wait_for(buffer.put_many(plugin), 5)  # one batch: an empty buffer takes it
    for record in agent:
        buffer.put_agent(record)
    loop, task = start_transfer(config, buffer)
    want = len(plugin) + len(agent)
    deadline = time.monotonic() + 120
    try:
        while sum(len(p.decoded.records) for p in center.packaged()) < want:
            assert not task.done(), task
            assert time.monotonic() < deadline, "records did not arrive within 120 s"
            await asyncio.sleep(0.1)
        assert loop.state.net_mode == "private"
        assert loop.state.stats.tx_records == want
        assert loop.state.stats.write_failures == 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return buffer


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_no_message_over_8_mib_with_50_mib_queued(
    tmp_path: Path, compression: Literal["gzip", "none"]
) -> None:
    plugin = make_records(QUEUED)
    assert sum(map(len, plugin)) >= QUEUED
    assert max(map(len, plugin)) > MiB - 200_000  # the large end of the mix is really there
    agent = [encode_record(1000, 1_764_168_000, {"hb": str(i)}) for i in range(3)]
    with CenterThread() as center:
        config = agent_config(center, tmp_path / "work", compression)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            buffer = runner.run(deliver(center, config, plugin, agent))
        packages = center.packaged()
        assert center.decode_errors == 0

    # Cancelled unconfirmed: the messages written last (the trail) are queued again.
    assert buffer.queued_bytes <= TRAIL_BYTES + MAX_MESSAGE_BYTES
    assert buffer.stats.dropped_oversize == 0
    sizes = [len(p.raw) for p in packages]
    assert max(sizes) <= MAX_MESSAGE_BYTES, f"largest PackagedData {max(sizes)} bytes"
    assert len(packages) >= QUEUED // MAX_MESSAGE_BYTES + 1
    # Messages are filled, not sent one record at a time.
    assert len(packages) < len(plugin) // 10

    received: list[bytes] = []
    header = HEADER.encode()
    for package in packages:
        records, header_at = field1_slices(package.raw)
        assert package.raw[header_at:] == header  # the pre-encoded header, after the records
        assert len(records) == len(package.decoded.records)
        assert package.decoded.agent_id == HEADER.agent_id
        received += records
    # The agent lane first, then every plugin record in order, byte for byte.
    assert received == agent + plugin


def test_a_full_message_goes_without_waiting_for_send_interval(tmp_path: Path) -> None:
    """Between rounds the send loop waits `send_interval`, unless a message's worth is queued:
    a fixed pause let a flood fill the buffer (and spool it) while the stream sat idle."""
    records = [encode_record(9999, 1_764_168_000, {"seq": str(i), "pad": "x" * 900})
               for i in range(12_000)]  # about 11 MiB: more than one message
    assert sum(map(len, records)) > MAX_MESSAGE_BYTES

    async def run(center: CenterThread) -> float:
        config = agent_config(center, tmp_path / "work", "none", send_interval=60.0)
        buffer = RecordBuffer()
        _, task = start_transfer(config, buffer)
        try:
            buffer.put_agent(encode_record(1000, 1_764_168_000, {"hb": "0"}))
            while not center.packaged():  # the first round: at once, then a 60 s pause
                assert not task.done(), task
                await asyncio.sleep(0.05)
            started = time.monotonic()
            for i in range(0, len(records), 500):  # in batches, all before the loop runs again
                await buffer.put_many(records[i : i + 500])
            want = len(records) + 1
            while sum(len(p.decoded.records) for p in center.packaged()) < want:
                assert not task.done(), task
                assert time.monotonic() - started < 30, "the records waited for send_interval"
                await asyncio.sleep(0.05)
            return time.monotonic() - started
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    with CenterThread() as center, asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        elapsed = runner.run(run(center))
    assert elapsed < 30
