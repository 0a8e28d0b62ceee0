"""The Transfer stream: one bi-directional gRPC call with mutual TLS to the AgentCenter.

`TransferLoop.run()` owns the connection life: walk the discovery ladder, open a fresh channel
(never re-open streams on a broken channel: grpcio issue 38499 leaks), announce the stream with a
heartbeat, then run the send and receive loops until either fails, close the channel, back off.

Send loop: every `send_interval` it drains the RecordBuffer into PackagedData messages built by
splicing (no protobuf objects per record) under the message cap. A message whose write fails goes
back to the head of the buffer, so nothing queued is lost to a broken stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from elkeid_agent.buffer import RecordBuffer
from elkeid_agent.config import Config
from elkeid_agent.transport.discovery import (
    Backoff,
    Candidate,
    DiscoveryError,
    NetMode,
    candidates,
    fetch_sd_nodes,
)
from elkeid_agent.transport.grpc_env import grpc
from elkeid_agent.transport.probe import probe
from elkeid_agent.transport.tls import TlsMaterial
from elkeid_agent.wire import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

TRANSFER_METHOD = "/grpc.Transfer/Transfer"
MAX_GRPC_MESSAGE = 10 * 1024 * 1024
# A stream that lived this long was healthy: the next failure starts backing off from 1 s again.
HEALTHY_STREAM_SECONDS = 30.0
# One message's write: HTTP/2 flow control parks it while the server does not read, and its
# transport still answers keepalive pings, so nothing else would end such a stream. An 8 MiB
# message needs 70 KB/s to make it.
WRITE_TIMEOUT = 120.0
# The diagnosis of a failed dial (transport/probe.py) gets this long per step.
PROBE_TIMEOUT = 5.0


@dataclass
class TransferStats:
    tx_records: int = 0
    tx_bytes: int = 0
    tx_messages: int = 0
    rx_commands: int = 0
    rx_bytes: int = 0
    connects: int = 0
    connect_failures: int = 0
    write_failures: int = 0


@dataclass
class LinkState:
    """What the heartbeat and `ctl status` report about the connection."""

    net_mode: NetMode = NetMode.UNKNOWN
    server: str = ""
    connected: bool = False
    connected_since: float = 0.0
    last_error: str = ""
    # Why each step of the last failed connection round failed, one line each (state_detail).
    dial_errors: list[str] = field(default_factory=list)
    stats: TransferStats = field(default_factory=TransferStats)


def channel_options(server_name: str, keepalive_seconds: int) -> list[tuple[str, Any]]:
    return [
        # The server's certificate is for this name whatever address we dialed.
        ("grpc.ssl_target_name_override", server_name),
        ("grpc.default_authority", server_name),
        ("grpc.keepalive_time_ms", keepalive_seconds * 1000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE),
        ("grpc.enable_retries", 0),
        # Our own backoff paces reconnects; a channel serves one stream and is then closed.
        ("grpc.initial_reconnect_backoff_ms", 1000),
    ]


class TransferLoop:
    def __init__(
        self,
        config: Config,
        tls: TlsMaterial,
        buffer: RecordBuffer,
        header: Callable[[], bytes],
        on_command: Callable[[bytes], Awaitable[None]],
        on_open: Callable[[], None],
        on_down: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.tls = tls
        self.buffer = buffer
        self.header = header
        self.on_command = on_command
        self.on_open = on_open
        self.on_down = on_down
        self._round_errors: list[str] = []
        self.state = LinkState()
        self.channel: grpc.aio.Channel | None = None
        t = config.transport
        self.backoff = Backoff(t.backoff_initial, t.backoff_multiplier, t.backoff_max,
                               t.backoff_jitter)
        self._compression = (
            grpc.Compression.Gzip if t.compression == "gzip" else grpc.Compression.NoCompression
        )

    # -- connection ladder ------------------------------------------------------------------------

    async def _ladder(self) -> list[Candidate]:
        region = self.config.regions.get(self.config.region)
        if region is None:
            return []
        nodes: list[str] = []
        if region.service_discovery:
            try:
                async with asyncio.timeout(self.config.transport.dial_timeout):
                    nodes = await fetch_sd_nodes(region.service_discovery)
            except DiscoveryError as exc:
                detail = str(exc).removeprefix("service discovery ")
                self._dial_failed(f"service discovery failed: {detail}")
            except TimeoutError:
                self._dial_failed(
                    f"service discovery failed: {region.service_discovery}: no answer within "
                    f"{self.config.transport.dial_timeout:g} s"
                )
        return candidates(region, nodes)

    def _dial_failed(self, reason: str) -> None:
        self._round_errors.append(reason)
        log.warning("%s", reason)

    async def _dial(self, candidate: Candidate) -> grpc.aio.Channel | None:
        channel = grpc.aio.secure_channel(
            candidate.address,
            self.tls.credentials(),
            options=channel_options(self.tls.server_name, self.config.transport.keepalive_seconds),
        )
        timeout = self.config.transport.dial_timeout
        try:
            async with asyncio.timeout(timeout):
                ready = await _ready_or_failed(channel)
            timed_out = False
        except TimeoutError:
            ready, timed_out = False, True
        if ready:
            return channel
        await channel.close()
        # gRPC says only UNAVAILABLE or nothing; the probe names the step that failed.
        try:
            async with asyncio.timeout(2 * PROBE_TIMEOUT):
                result = await asyncio.to_thread(
                    probe, candidate.address, self.tls, min(PROBE_TIMEOUT, timeout)
                )
            reason = result.reason if not result.ok else ""
        except TimeoutError:
            reason = f"no diagnosis within {2 * PROBE_TIMEOUT:g} s (name resolution hangs?)"
        except Exception as exc:  # noqa: BLE001 - a diagnosis must never end the transfer loop
            reason = f"gRPC could not connect; the diagnosis failed: {exc!r}"
        if not reason:
            reason = (
                f"gRPC dial timed out after {timeout:g} s" if timed_out
                else "gRPC could not connect, yet a plain TLS dial just succeeded"
            )
        self._dial_failed(f"dial {candidate.address} ({candidate.net_mode}): {reason}")
        return None

    async def connect(self) -> tuple[grpc.aio.Channel, Candidate] | None:
        self._round_errors = []
        ladder = await self._ladder()
        if not ladder and not self._round_errors:
            self._dial_failed(f"no address configured for region {self.config.region}")
        for candidate in ladder:
            channel = await self._dial(candidate)
            if channel is not None:
                return channel, candidate
        self.state.dial_errors = self._round_errors
        return None

    # -- the loop ----------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            connected = await self.connect()
            if connected is None:
                self.state.stats.connect_failures += 1
                self.state.last_error = "; ".join(self.state.dial_errors)
                self.on_down()
                delay = self.backoff.next()
                log.warning("no AgentCenter reachable; retrying in %.1f s", delay)
                await asyncio.sleep(delay)
                continue
            channel, candidate = connected
            started = time.monotonic()
            try:
                await self._session(channel, candidate)
            except StreamClosed as exc:
                self.state.last_error = str(exc)
                self.state.dial_errors = [f"stream to {candidate.address} ended: {exc}"]
                log.warning("stream to %s ended: %s", candidate.address, exc)
            finally:
                self.state.connected = False
                self.channel = None
                await channel.close()
            self.on_down()
            if time.monotonic() - started >= HEALTHY_STREAM_SECONDS:
                self.backoff.reset()
            await asyncio.sleep(self.backoff.next())

    async def _session(self, channel: grpc.aio.Channel, candidate: Candidate) -> None:
        call = channel.stream_stream(
            TRANSFER_METHOD, request_serializer=None, response_deserializer=None
        )(compression=self._compression)
        self.channel = channel
        self.state.net_mode = candidate.net_mode
        self.state.server = candidate.address
        self.state.connected = True
        self.state.connected_since = time.time()
        self.state.last_error = ""
        self.state.dial_errors = []
        self.state.stats.connects += 1
        log.info("connected to %s (%s)", candidate.address, candidate.net_mode)
        # The server pushes the full Configs after the first heartbeat of a connection.
        self.on_open()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._send_loop(call))
                tg.create_task(self._receive_loop(call))
        except ExceptionGroup as group:
            ended, other = group.split((grpc.aio.AioRpcError, StreamClosed))
            if other is not None or ended is None:
                raise
            raise StreamClosed(_describe(ended.exceptions[0])) from None
        finally:
            call.cancel()

    async def _send_loop(self, call: grpc.aio.StreamStreamCall) -> None:
        interval = self.config.transport.send_interval
        while True:
            await self.buffer.wait_nonempty()
            await self.flush(call)
            await asyncio.sleep(interval)

    async def flush(self, call: grpc.aio.StreamStreamCall) -> None:
        """Send everything queued, in messages under the cap."""
        stats = self.state.stats
        while len(self.buffer):
            header = self.header()
            batch = self.buffer.take(MAX_MESSAGE_BYTES - len(header))
            if not batch.chunks:
                return
            message = batch.spliced + header
            try:
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await call.write(message)
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
                self.buffer.requeue(batch)
                stats.write_failures += 1
                raise StreamClosed(f"write failed: {_describe(exc)}") from exc
            except TimeoutError as exc:
                self.buffer.requeue(batch)
                stats.write_failures += 1
                raise StreamClosed(
                    f"write failed: not taken within {WRITE_TIMEOUT:g} s (the server does not "
                    "read the stream)"
                ) from exc
            except asyncio.CancelledError:
                self.buffer.requeue(batch)
                raise
            stats.tx_messages += 1
            stats.tx_records += batch.count
            stats.tx_bytes += len(message)

    async def _receive_loop(self, call: grpc.aio.StreamStreamCall) -> None:
        stats = self.state.stats
        while True:
            raw = await call.read()
            if raw is grpc.aio.EOF:
                raise StreamClosed("server closed the stream")
            stats.rx_commands += 1
            stats.rx_bytes += len(raw)
            await self.on_command(raw)


async def _ready_or_failed(channel: grpc.aio.Channel) -> bool:
    """True once the channel is ready, False as soon as its first attempt fails (a refused
    port fails in milliseconds; `channel_ready()` would retry until the timeout)."""
    state = channel.get_state(try_to_connect=True)
    while state is not grpc.ChannelConnectivity.READY:
        if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN):
            return False
        await channel.wait_for_state_change(state)
        state = channel.get_state(try_to_connect=True)
    return True


class StreamClosed(Exception):
    """The stream ended; the loop reconnects."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__
