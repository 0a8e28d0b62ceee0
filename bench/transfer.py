"""Transfer benchmark (issue 2): records/s and agent CPU-seconds per 100k records.

300-byte plugin records are queued into a RecordBuffer (put_many in pipe-read sized
batches, as the plugin reader does) and delivered by a real TransferLoop over mutual TLS
to a sink AgentCenter on 127.0.0.1, once with compression `none` and once with `gzip`.

The sink runs in a child process (this same file with `--sink`), so only the agent side's
CPU is counted: `time.process_time()` of this process, which includes grpc's C-core
threads. The sink counts the records of each stream and, once it has them all, answers
with a Command whose Task data is its tally; the clock stops when that Command arrives.

Baselines printed in the same run, for comparison:
* encode only, splice (what TransferLoop does) vs protobuf objects per record
  (EncodedRecord.FromString for each record, appended to a PackagedData, then
  SerializeToString: the naive way);
* end to end, the naive way: the same channel and sink, each message built with protobuf
  objects per record and grpc's protobuf serializer, no buffer.

    .venv/bin/python bench/transfer.py [--records N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc  # noqa: E402
import uvloop  # noqa: E402

from elkeid_agent._proto import grpc_pb2  # noqa: E402
from elkeid_agent.buffer import RecordBuffer  # noqa: E402
from elkeid_agent.config import Config, RegionConfig, TlsConfig, TransportConfig  # noqa: E402
from elkeid_agent.transport.stream import (  # noqa: E402
    TRANSFER_METHOD,
    TransferLoop,
    channel_options,
)
from elkeid_agent.transport.tls import TlsMaterial  # noqa: E402
from elkeid_agent.wire import MAX_MESSAGE_BYTES, Header, encode_record, splice_records  # noqa: E402

RECORD_BYTES = 300
DISTINCT = 1000  # distinct record contents, reused cyclically
PUT_BATCH = 1000  # records per put_many (about one 300 KiB pipe read)
HEADER = Header(
    agent_id="bench-agent",
    intranet_ipv4=["10.0.0.5"],
    extranet_ipv4=["192.0.2.5"],
    intranet_ipv6=["fd00::5"],
    extranet_ipv6=[],
    hostname="bench-host",
    version="1.0.0",
    product="elkeid-agent",
)
Compression = Literal["none", "gzip"]


# --- the sink (child process) -------------------------------------------------------------------


async def sink(certs_dir: str, expected: int) -> None:
    from elkeid_center.certs import ensure_certs
    from elkeid_center.server import SERVER_OPTIONS, ServerTls, transfer_handler

    tls = ServerTls.from_certs(ensure_certs(certs_dir))

    async def transfer(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[grpc_pb2.Command]:
        records = messages = size = 0
        largest = 0
        async for raw in requests:
            records += len(grpc_pb2.PackagedData.FromString(raw).records)
            messages += 1
            size += len(raw)
            largest = max(largest, len(raw))
            if records >= expected:
                tally = {
                    "records": records,
                    "messages": messages,
                    "bytes": size,
                    "largest": largest,
                    "sink_cpu": time.process_time(),
                }
                yield grpc_pb2.Command(task=grpc_pb2.Task(data=json.dumps(tally)))
                records = messages = size = largest = 0

    server = grpc.aio.server(
        options=[*SERVER_OPTIONS, ("grpc.compression_enabled_algorithms_bitset", 0b111)]
    )
    server.add_generic_rpc_handlers((transfer_handler(transfer),))
    port = server.add_secure_port("127.0.0.1:0", tls.credentials())
    await server.start()
    print(f"PORT {port}", flush=True)
    await server.wait_for_termination()


# --- the agent side (this process) ---------------------------------------------------------------


def make_records(count: int) -> list[bytes]:
    """`count` plugin Record encodings of exactly RECORD_BYTES bytes each."""
    rng = random.Random(2)
    distinct = []
    for i in range(DISTINCT):
        # Like an exec event: a few repetitive fields and some high-entropy ones (hashes, ids),
        # so gzip has real work (about 2:1 here) rather than a run of one byte.
        fields = {"seq": str(i), "exe": "/usr/bin/bench", "argv": "bench --run", "data": ""}
        noise = rng.randbytes(RECORD_BYTES).hex()
        pad = RECORD_BYTES - len(encode_record(9999, 1_764_168_000, fields))
        while True:
            fields["data"] = noise[:pad]
            record = encode_record(9999, 1_764_168_000, fields)
            if len(record) == RECORD_BYTES:
                break
            pad += RECORD_BYTES - len(record)
        distinct.append(record)
    return [distinct[i % DISTINCT] for i in range(count)]


def agent_config(certs_dir: Path, address: str, compression: Compression) -> Config:
    return Config(
        work_dir=str(certs_dir),
        tls=TlsConfig(
            ca=str(certs_dir / "ca.crt"),
            cert=str(certs_dir / "client.crt"),
            key=str(certs_dir / "client.key"),
        ),
        transport=TransportConfig(compression=compression),
        regions={"default": RegionConfig(private=address)},
    )


class Result:
    def __init__(self, name: str, records: int, wall: float, cpu: float, tally: dict[str, Any]):
        self.name, self.records, self.wall, self.cpu, self.tally = name, records, wall, cpu, tally

    def line(self) -> str:
        rate = self.records / self.wall
        per_100k = self.cpu / self.records * 100_000
        extra = ""
        if self.tally:
            extra = (
                f"  ({self.tally['messages']} messages, largest {self.tally['largest']} B,"
                f" {self.tally['bytes'] / self.wall / 1e6:.0f} MB/s)"
            )
        return (
            f"{self.name:<44} {rate:>10,.0f} records/s  {per_100k:6.3f} agent CPU-s/100k"
            f"  wall {self.wall:5.2f} s{extra}"
        )


async def run_transfer(config: Config, records: list[bytes], name: str) -> Result:
    """Queue `records` into a RecordBuffer and deliver them with a TransferLoop."""
    buffer = RecordBuffer(config.buffer.max_bytes, config.buffer.agent_lane_bytes)
    done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    async def on_command(raw: bytes) -> None:
        if not done.done():
            done.set_result(json.loads(grpc_pb2.Command.FromString(raw).task.data))

    header = HEADER.encode()
    loop = TransferLoop(
        config, TlsMaterial.load(config.tls), buffer, lambda: header, on_command, lambda: None
    )
    transfer = asyncio.create_task(loop.run())
    while not loop.state.connected:  # connect outside the measurement
        if transfer.done():
            transfer.result()
        await asyncio.sleep(0.01)

    async def produce() -> None:
        for start in range(0, len(records), PUT_BATCH):
            await buffer.put_many(records[start : start + PUT_BATCH])

    cpu0, wall0 = time.process_time(), time.perf_counter()
    producer = asyncio.create_task(produce())
    tally = await asyncio.wait_for(done, 300)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    await producer
    transfer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await transfer
    if tally["records"] != len(records):
        raise SystemExit(f"{name}: sink got {tally['records']} records, sent {len(records)}")
    return Result(name, len(records), wall, cpu, tally)


def naive_message(records: list[bytes]) -> grpc_pb2.PackagedData:
    """The naive way: one protobuf object per record, header set on the message object."""
    message = grpc_pb2.PackagedData(
        agent_id=HEADER.agent_id,
        intranet_ipv4=HEADER.intranet_ipv4,
        extranet_ipv4=HEADER.extranet_ipv4,
        intranet_ipv6=HEADER.intranet_ipv6,
        extranet_ipv6=HEADER.extranet_ipv6,
        hostname=HEADER.hostname,
        version=HEADER.version,
        product=HEADER.product,
    )
    for raw in records:
        message.records.append(grpc_pb2.EncodedRecord.FromString(raw))
    return message


def per_message(records: list[bytes]) -> list[list[bytes]]:
    """Chunks of records as TransferLoop sizes them (spliced size under the cap)."""
    step = (MAX_MESSAGE_BYTES - 4096) // (RECORD_BYTES + 3)
    return [records[i : i + step] for i in range(0, len(records), step)]


async def run_naive(config: Config, records: list[bytes]) -> Result:
    """End to end without buffer or splice: protobuf objects and grpc's serializer."""
    tls = TlsMaterial.load(config.tls)
    address = config.regions["default"].private
    assert address is not None
    channel = grpc.aio.secure_channel(
        address, tls.credentials(), options=channel_options(tls.server_name, 30)
    )
    await channel.channel_ready()
    call = channel.stream_stream(
        TRANSFER_METHOD,
        request_serializer=grpc_pb2.PackagedData.SerializeToString,
        response_deserializer=grpc_pb2.Command.FromString,
    )(compression=grpc.Compression.NoCompression)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for chunk in per_message(records):
        await call.write(naive_message(chunk))
    command = await call.read()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    call.cancel()
    await channel.close()
    tally = json.loads(command.task.data)
    return Result("baseline, protobuf objects end to end (none)", len(records), wall, cpu, tally)


def encode_only(records: list[bytes]) -> tuple[Result, Result]:
    chunks = per_message(records)
    header = HEADER.encode()
    cpu0 = time.process_time()
    for chunk in chunks:
        naive_message(chunk).SerializeToString()
    naive = time.process_time() - cpu0
    cpu0 = time.process_time()
    for chunk in chunks:
        splice_records(chunk, header)
    splice = time.process_time() - cpu0
    return (
        Result("encode only: splice (ours)", len(records), max(splice, 1e-9), splice, {}),
        Result("encode only: baseline, protobuf objects", len(records), naive, naive, {}),
    )


def start_sink(certs_dir: Path, expected: int) -> tuple[subprocess.Popen[str], str]:
    sink_proc = subprocess.Popen(
        [sys.executable, __file__, "--sink", str(certs_dir), "--records", str(expected)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sink_proc.stdout is not None
    line = sink_proc.stdout.readline()
    if not line.startswith("PORT "):
        sink_proc.kill()
        raise SystemExit(f"sink did not start: {line!r}")
    return sink_proc, f"127.0.0.1:{int(line.split()[1])}"


async def run_all(certs_dir: Path, address: str, records: list[bytes]) -> list[Result]:
    results: list[Result] = []
    for compression in ("none", "gzip"):
        config = agent_config(certs_dir, address, compression)
        name = f"TransferLoop, compression {compression}"
        results.append(await run_transfer(config, records, name))
        print(results[-1].line(), flush=True)
    results.append(await run_naive(agent_config(certs_dir, address, "none"), records))
    print(results[-1].line(), flush=True)
    return results


def bench(count: int) -> None:
    from elkeid_center.certs import ensure_certs

    print(f"{count:,} records of {RECORD_BYTES} B; agent = this process, center = child process")
    records = make_records(count)
    with tempfile.TemporaryDirectory(prefix="elkeid-bench-") as tmp:
        certs_dir = Path(tmp)
        ensure_certs(certs_dir)
        sink_proc, address = start_sink(certs_dir, count)
        try:
            # One event loop for every phase: grpc.aio binds to the loop it first runs on.
            results = uvloop.run(run_all(certs_dir, address, records))
        finally:
            sink_proc.terminate()
            sink_proc.wait(10)
    for result in encode_only(records):
        per_100k = result.cpu / result.records * 100_000
        print(f"{result.name:<44} {'':>21}  {per_100k:6.3f} agent CPU-s/100k")
    target = results[0].records / results[0].wall
    print(f"target >= 200,000 records/s with none: {'met' if target >= 200_000 else 'NOT met'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--sink", metavar="CERTS_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sink:
        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(sink(args.sink, args.records))
        return
    bench(args.records)


if __name__ == "__main__":
    main()
