"""The Transfer stream: one bi-directional gRPC call with mutual TLS to the AgentCenter.

`TransferLoop.run()` owns the connection life: walk the discovery ladder, open a fresh channel
(never re-open streams on a broken channel: grpcio issue 38499 leaks), announce the stream with a
heartbeat, then run the send and receive loops until either fails, close the channel, back off.

Send loop: as soon as records are queued, then every `send_interval` or as soon as a full
message's worth is queued, it drains the RecordBuffer into PackagedData messages built by
splicing (no protobuf objects per record) under the message cap. A message whose write fails goes
back to the head of the buffer, so nothing queued is lost to a broken stream. While the spool
holds a backlog, each round sends the agent lane from memory, then the spool oldest first, and
the plugin lanes in memory only once the spool is empty (`spool.pump` states the order rule);
a spool batch is forgotten only after its write succeeded.

Orderly exit (`finish`): the send loop stops taking records, half-closes the stream and the
loop waits for the server to end it: a server that ends the stream has read every message
written before (the protocol's only acknowledgement); what stayed queued goes to the spool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from elkeid_agent.buffer import Batch, Lane, RecordBuffer
from elkeid_agent.config import Config
from elkeid_agent.spool.store import TRAIL_BYTES, ReadBatch, Spool
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
from elkeid_agent.transport.tls import TlsError, TlsMaterial
from elkeid_agent.wire import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

TRANSFER_METHOD = "/grpc.Transfer/Transfer"
MAX_GRPC_MESSAGE = 10 * 1024 * 1024
#: Below the spool's high-water mark (spool.pump.HIGH_WATER, half of the buffer).
FILL_MARK = 0.25
# A stream that lived this long was healthy: the next failure starts backing off from the
# initial delay again. Short enough that a server restarting every few seconds is rejoined
# within seconds of each return; one that ends each stream at once still backs off
# (tests/test_reconnect.py measures both).
HEALTHY_STREAM_SECONDS = 3.0
# One message's write: HTTP/2 flow control parks it while the server does not read, and its
# transport still answers keepalive pings, so nothing else would end such a stream. An 8 MiB
# message needs 70 KB/s to make it.
WRITE_TIMEOUT = 120.0
# Messages of records from memory hold at most this much, unless one record is larger: below
# memory.MMAP_THRESHOLD, so that they and grpc's copies come from the heap, which reuses their
# pages. Each 8 MiB message used to be mapped and unmapped, every page of it and of grpc's copy
# faulted in again: 31,000 page faults/s in a flood, a fifth of the agent's CPU, and one message
# in flight (with grpc's copy) beside the trail's held 24 MiB (bench/record_memory.py).
LIVE_MESSAGE_BYTES = 2 * 1024 * 1024
# A message being written is in memory twice: our bytes and grpc's copy (grpc.aio copies the
# message into its own buffer when the write starts and keeps ours until it completes).
IN_FLIGHT_COPIES = 2
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
    resent_records: int = 0


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
        spool: Spool | None = None,
    ) -> None:
        self.config = config
        self.spool = spool
        self._finishing = False
        self._half_closed = False
        self._session_ended = asyncio.Event()
        # Messages written on the current stream and not known to be read, oldest first:
        # TRAIL_BYTES of them (the newest always). A stream that ends otherwise than by the
        # server's answer to our half-close sends them again (duplicates, never loss).
        # A batch from memory keeps its message's bytes (its chunks point into it): held
        # against the buffer's budget while trailed. A spool batch keeps only its entries.
        self._trail: deque[tuple[Batch | ReadBatch, int]] = deque()
        self._trail_bytes = 0
        self._trail_held = 0
        if spool is not None:
            spool.connected = lambda: self.state.connected
        self.tls = tls
        # Why the certificates on disk were last refused ("" when they loaded).
        self.tls_problem = ""
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

    async def reload_tls(self) -> None:
        """The certificates as they are on disk now: a renewed cert, key or CA is used from
        this round on; one that does not load keeps the last good material, and says why."""
        try:
            material = await asyncio.to_thread(TlsMaterial.load, self.config.tls)
        except TlsError as exc:
            problem = f"renewed certificates not used ({exc}); the ones read before are"
            if problem != self.tls_problem:
                log.error("%s", problem)
            self.tls_problem = problem
            return
        self.tls_problem = ""
        if material != self.tls:
            log.info("certificates changed on disk: this connection round uses the new ones")
            self.tls = material

    async def connect(self) -> tuple[grpc.aio.Channel, Candidate] | None:
        self._round_errors = []
        await self.reload_tls()
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
        while not self._finishing:
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
            if self._finishing:
                await channel.close()
                break
            started = time.monotonic()
            try:
                await self._session(channel, candidate)
            except StreamClosed as exc:
                # Only the text goes on: the exception's context and traceback hold the
                # session's frames, and with them the call and the channel.
                reason = str(exc)
                self.state.last_error = reason
                self.state.dial_errors = [f"stream to {candidate.address} ended: {reason}"]
                log.warning("stream to %s ended: %s", candidate.address, reason)
            finally:
                self.state.connected = False
                self.channel = None
                self._resend_trail()
                await channel.close()
                self._session_ended.set()
            self.on_down()
            if self._finishing:
                break
            await asyncio.sleep(delay_after_stream(self.backoff, time.monotonic() - started))

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
        self._half_closed = False
        log.info("connected to %s (%s)", candidate.address, candidate.net_mode)
        # The server pushes the full Configs after the first heartbeat of a connection.
        self.on_open()
        try:
            async with asyncio.TaskGroup() as tg:
                loops = (tg.create_task(self._send_loop(call)),
                         tg.create_task(self._receive_loop(call)))
                # Waited for here, not in the group's exit: Python 3.11's group cancels its
                # task when a loop fails during the exit and never takes that cancel back,
                # so each ended stream would add one to `cancelling()` for good.
                await asyncio.wait(loops, return_when=asyncio.FIRST_EXCEPTION)
        except ExceptionGroup as group:
            ended, other = group.split((grpc.aio.AioRpcError, StreamClosed))
            if other is not None or ended is None:
                raise
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # A cancel came as the stream ended, and the group raised the stream's end in
                # its place: passed on, or `run` would carry on connecting after its owner
                # has left (an exit that never ends).
                raise asyncio.CancelledError from None
            raise StreamClosed(_describe(ended.exceptions[0])) from None
        finally:
            call.cancel()

    async def _send_loop(self, call: grpc.aio.StreamStreamCall) -> None:
        interval = self.config.transport.send_interval
        while not self._finishing:
            if not self._backlog():
                # Records, or an orderly exit (`finish` wakes this wait).
                await self.buffer.wait_nonempty()
            await self.flush(call)
            # A full message ends the pause, or what the spool starts moving at (a buffer
            # configured small), whichever is less.
            full = min(LIVE_MESSAGE_BYTES, int(self.buffer.max_bytes * FILL_MARK))
            await self.buffer.wait_filled(full, interval)
        await call.done_writing()
        self._half_closed = True

    async def finish(self, timeout: float) -> None:  # noqa: ASYNC109 - a bound, not a deadline
        """Orderly exit: stop sending, half-close, wait for the server to end the stream."""
        self._finishing = True
        self.buffer.wake()
        if not self.state.connected:
            return
        self._session_ended.clear()
        try:
            async with asyncio.timeout(timeout):
                await self._session_ended.wait()
        except TimeoutError:
            log.warning("the server did not end the stream within %.0f s: the last messages "
                        "written may not have been read", timeout)

    def _backlog(self) -> bool:
        return self.spool is not None and self.spool.records > 0

    async def flush(self, call: grpc.aio.StreamStreamCall) -> None:
        """Send everything queued (the spool's backlog first), in messages under the cap."""
        while not self._finishing:
            header = self.header()
            cap = LIVE_MESSAGE_BYTES - len(header)
            # A record larger than `cap` goes alone, in a message up to the protocol's cap.
            record_max = MAX_MESSAGE_BYTES - len(header)
            if self.spool is not None and self._backlog():
                if self.buffer.lane_bytes(Lane.AGENT):
                    batch = self.buffer.take(cap, (Lane.AGENT,), record_max=record_max)
                    await self._send(call, batch, header)
                    continue
                backlog = await self.spool.read(cap)
                if backlog.entries:
                    await self._send_spooled(call, self.spool, backlog, header)
                continue
            if not len(self.buffer):
                return
            batch = self.buffer.take(cap, record_max=record_max)
            if not batch.chunks:
                return
            await self._send(call, batch, header)

    async def _send(self, call: grpc.aio.StreamStreamCall, batch: Batch, header: bytes) -> None:
        message = batch.message(header)
        # In memory until the write is done: the message and grpc's copy of it (the batch's
        # chunks point into the message). Counted against the buffer's memory budget.
        held = IN_FLIGHT_COPIES * len(message)
        self.buffer.hold(held)
        try:
            await self._write(call, message)
        except BaseException:
            # Failed, timed out or cancelled: the batch goes back to the head.
            self._requeue(batch, resent=False)
            raise
        finally:
            self.buffer.release(held)
        self._trailed(batch, len(message))
        self._sent(batch.count, len(message))

    def _requeue(self, batch: Batch, resent: bool) -> None:
        """Records from memory to send again, before everything queued: at the head of the
        spool if there is one (the spooler may have moved newer records there meanwhile, and
        the spool's order rule sends it first), else at the head of their lanes."""
        if self.spool is not None:
            self.spool.prepend(batch, resent)
        else:
            self.buffer.requeue(batch)

    def _trailed(self, batch: Batch | ReadBatch, size: int) -> None:
        if isinstance(batch, Batch):
            self.buffer.hold_sent(size)
            self._trail_held += size
        self._trail.append((batch, size))
        self._trail_bytes += size
        while len(self._trail) > 1 and self._trail_bytes > TRAIL_BYTES:
            old, old_size = self._trail.popleft()
            self._trail_bytes -= old_size
            if isinstance(old, Batch):
                self._untrail(old_size)

    def _untrail(self, size: int) -> None:
        self._trail_held -= size
        self.buffer.release_sent(size)

    def _clear_trail(self) -> None:
        self._trail.clear()
        self._trail_bytes = 0
        self._untrail(self._trail_held)

    def _resend_trail(self) -> None:
        """The stream ended: unless the server confirmed it read everything, what was written
        last goes back, newest first to the head, so it leaves again in the order it went."""
        resent = 0
        while self._trail:
            batch, _size = self._trail.pop()
            if isinstance(batch, ReadBatch):
                if self.spool is not None:
                    resent += self.spool.unsend(batch)
            else:
                self._requeue(batch, resent=True)
                resent += batch.count
        self._clear_trail()
        if resent:
            self.state.stats.resent_records += resent
            log.info("%d records written on the ended stream will be sent again", resent)

    async def _send_spooled(
        self, call: grpc.aio.StreamStreamCall, spool: Spool, batch: ReadBatch, header: bytes
    ) -> None:
        # A failed or cancelled write leaves the entries in the spool, still at its head.
        # Joined in one copy; the payloads read are let go at once (the entries are enough
        # to unread, commit or unsend the batch).
        message = b"".join([*batch.payloads, header])
        batch.payloads = []
        # The message and grpc's copy, until the write is done.
        held = IN_FLIGHT_COPIES * len(message)
        self.buffer.hold(held)
        try:
            await self._write(call, message)
        except BaseException:
            spool.unread(batch)
            raise
        finally:
            self.buffer.release(held)
        spool.commit(batch)
        self._trailed(batch, len(message))
        self._sent(batch.count, len(message))

    async def _write(self, call: grpc.aio.StreamStreamCall, message: bytes) -> None:
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                await call.write(message)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            self.state.stats.write_failures += 1
            raise StreamClosed(f"write failed: {_describe(exc)}") from exc
        except TimeoutError as exc:
            self.state.stats.write_failures += 1
            raise StreamClosed(
                f"write failed: not taken within {WRITE_TIMEOUT:g} s (the server does not "
                "read the stream)"
            ) from exc

    def _sent(self, records: int, size: int) -> None:
        stats = self.state.stats
        stats.tx_messages += 1
        stats.tx_records += records
        stats.tx_bytes += size

    async def _receive_loop(self, call: grpc.aio.StreamStreamCall) -> None:
        stats = self.state.stats
        while True:
            raw = await call.read()
            if raw is grpc.aio.EOF:
                if self._finishing and self._half_closed:
                    # The answer to our half-close: everything written was read.
                    if self.spool is not None:
                        self.spool.confirm()
                    self._clear_trail()
                    return
                raise StreamClosed("server closed the stream")
            stats.rx_commands += 1
            stats.rx_bytes += len(raw)
            await self.on_command(raw)


def delay_after_stream(backoff: Backoff, lived: float) -> float:
    """The wait before reconnecting after a stream that lived `lived` seconds: from the
    initial delay again after a healthy one, else growing (a server that ends each stream at
    once is not hammered)."""
    if lived >= HEALTHY_STREAM_SECONDS:
        backoff.reset()
    return backoff.next()


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
