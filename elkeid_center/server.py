"""The AgentCenter side of PROTOCOL.md section 1: Transfer and FileExt over mutual TLS.

Transfer is registered with no request deserializer so the center sees the bytes the
agent sent, exactly, and decodes them itself: tests can then check both the wire bytes
and their meaning. Like the real AgentCenter, the first agent heartbeat (data_type 1000)
of a stream triggers a push of the current Configs.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
from google.protobuf.message import DecodeError

from elkeid_agent._proto import grpc_pb2
from elkeid_center.certs import CertFiles
from elkeid_center.store import Store

MAX_MESSAGE_BYTES = 10 * 1024 * 1024
# The AgentCenter's keepalive enforcement: pings closer than 5 s apart get the
# connection closed with too_many_pings, and idle connections go after 20 minutes.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_connection_idle_ms", 20 * 60 * 1000),
    # A restarted center must get its port back, and two centers must never share one.
    ("grpc.so_reuseport", 0),
)
# Message compression accepted from the agent: identity, deflate and gzip (grpcio has
# no snappy or zstd; the Python agent offers gzip).
_ACCEPTED_COMPRESSION = 0b111

Target = Literal["all", "latest"]
ConfigLike = grpc_pb2.Config | Mapping[str, Any]
#: What the center can push: a Command, or bytes sent as they are (for tests of the agent's
#: decoding: wrong wire types, truncations, invalid UTF-8 the protobuf API cannot build).
CommandLike = grpc_pb2.Command | bytes


def serialize_command(command: CommandLike) -> bytes:
    return command if isinstance(command, bytes) else command.SerializeToString()


def transfer_handler(behaviour: Any) -> grpc.GenericRpcHandler:
    """`/grpc.Transfer/Transfer` taking raw PackagedData bytes (no deserializer, as the real
    AgentCenter's identity codec) and sending Commands; `behaviour(request_iterator, context)`
    is an async generator of Commands."""
    return grpc.method_handlers_generic_handler(
        "grpc.Transfer",
        {
            "Transfer": grpc.stream_stream_rpc_method_handler(
                behaviour,
                request_deserializer=None,
                response_serializer=serialize_command,
            )
        },
    )


@dataclass(frozen=True)
class ServerTls:
    """What the server presents (cert, key) and which CA its clients must come from."""

    client_ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_certs(cls, certs: CertFiles) -> ServerTls:
        return cls(certs.ca, certs.server_cert, certs.server_key)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.client_ca.read_bytes(),
            require_client_auth=True,
        )


def make_config(config: ConfigLike) -> grpc_pb2.Config:
    """A Config from a dict with the proto's field names (or a Config, copied)."""
    if isinstance(config, grpc_pb2.Config):
        out = grpc_pb2.Config()
        out.CopyFrom(config)
        return out
    unknown = set(config) - set(grpc_pb2.Config.DESCRIPTOR.fields_by_name)
    if unknown:
        raise ValueError(f"unknown Config field(s): {sorted(unknown)}")
    return grpc_pb2.Config(**config)


def configs_command(configs: Iterable[ConfigLike]) -> grpc_pb2.Command:
    return grpc_pb2.Command(configs=[make_config(c) for c in configs])


def task_command(
    data_type: int,
    object_name: str,
    data: str | Mapping[str, Any] = "",
    token: str = "",
) -> grpc_pb2.Command:
    """A Task Command; a mapping `data` is sent as JSON, as the AgentCenter does."""
    text = data if isinstance(data, str) else json.dumps(data)
    return grpc_pb2.Command(
        task=grpc_pb2.Task(data_type=data_type, object_name=object_name, data=text, token=token)
    )


class _Disconnect:
    """Queue marker: end this stream with UNAVAILABLE, as a server going away would."""


_DISCONNECT = _Disconnect()


class _End:
    """Sentinel: end the stream with OK at once, whatever the agent still sends."""


_END = _End()


@dataclass
class _Stream:
    id: int
    queue: asyncio.Queue[CommandLike | _Disconnect | _End | None]


class AgentCenterServer:
    """grpc.aio server for Transfer and FileExt. All methods run on its event loop."""

    def __init__(
        self, store: Store, tls: ServerTls, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.store = store
        self.tls = tls
        self.host = host
        self.port = port
        self.upload_status = grpc_pb2.FileUploadResponse.SUCCESS
        self._configs: grpc_pb2.Command | None = None
        self._server: grpc.aio.Server | None = None
        self._streams: dict[int, _Stream] = {}
        self._ids = itertools.count(1)
        #: Records per second this center reads at most (None: as fast as it can): a server
        #: slower than the agent, as a real one that decodes every record is under a flood.
        #: The stream's messages wait in grpc's buffers and HTTP/2 flow control, unread.
        self.read_rate: float | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> int:
        """Listen (on the same port as before after a stop) and return the port."""
        if self._server is not None:
            return self.port
        server = grpc.aio.server(
            options=[
                *SERVER_OPTIONS,
                ("grpc.compression_enabled_algorithms_bitset", _ACCEPTED_COMPRESSION),
            ],
            compression=grpc.Compression.NoCompression,
        )
        server.add_generic_rpc_handlers(
            (
                transfer_handler(self._transfer),
                grpc.method_handlers_generic_handler(
                    "grpc.FileExt",
                    {
                        "Upload": grpc.stream_unary_rpc_method_handler(
                            self._upload,
                            request_deserializer=grpc_pb2.FileUploadRequest.FromString,
                            response_serializer=grpc_pb2.FileUploadResponse.SerializeToString,
                        )
                    },
                ),
            )
        )
        port: int = server.add_secure_port(f"{self.host}:{self.port}", self.tls.credentials())
        if port == 0:
            raise OSError(f"cannot listen on {self.host}:{self.port}")
        await server.start()
        self.port = port
        self._server = server
        return port

    async def stop(self) -> None:
        """Stop listening and cut every stream (no grace: tests want a hard break)."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(None)

    # --- commands ----------------------------------------------------------------

    @property
    def configs(self) -> grpc_pb2.Command | None:
        return self._configs

    def set_configs(self, configs: Iterable[ConfigLike] | None) -> None:
        """Configs pushed on each stream's first heartbeat; None = push nothing."""
        self._configs = None if configs is None else configs_command(configs)

    def open_streams(self) -> list[int]:
        return list(self._streams)

    def _targets(self, target: Target | int) -> list[_Stream]:
        if isinstance(target, int):
            stream = self._streams.get(target)
            return [stream] if stream is not None else []
        if target == "latest":
            return [self._streams[max(self._streams)]] if self._streams else []
        return list(self._streams.values())

    def push(self, command: CommandLike, target: Target | int = "all") -> int:
        """Queue `command` (a Command, or raw bytes sent verbatim) for the target streams
        (a stream id, the newest, or all); returns how many streams it was queued for."""
        streams = self._targets(target)
        for stream in streams:
            stream.queue.put_nowait(command)
        return len(streams)

    def disconnect(self, target: Target | int = "all") -> int:
        """End the target streams with UNAVAILABLE while the server keeps listening."""
        streams = self._targets(target)
        for stream in streams:
            stream.queue.put_nowait(_DISCONNECT)
        return len(streams)

    def end(self, target: Target | int = "all") -> int:
        """End the target streams cleanly (status OK) without waiting for the agent's
        half-close: what an agent must not take for the answer to its own half-close."""
        streams = self._targets(target)
        for stream in streams:
            stream.queue.put_nowait(_END)
        return len(streams)

    # --- handlers ----------------------------------------------------------------

    async def _transfer(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> None:
        stream = _Stream(next(self._ids), asyncio.Queue())
        self.store.open_connection(stream.id, context.peer())
        self._streams[stream.id] = stream
        reader = asyncio.create_task(self._read(stream, request_iterator))
        try:
            while (item := await stream.queue.get()) is not None:
                if isinstance(item, _Disconnect):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "disconnected by center")
                if isinstance(item, _End):
                    return
                await context.write(item)
            await reader
        finally:
            reader.cancel()
            del self._streams[stream.id]
            self.store.close_connection(stream.id)

    async def _read(self, stream: _Stream, request_iterator: AsyncIterator[bytes]) -> None:
        """Store each message; the end of the client's side ends the stream."""
        due = time.monotonic()
        try:
            async for raw in request_iterator:
                decoded = grpc_pb2.PackagedData()
                try:
                    decoded.ParseFromString(raw)
                except DecodeError:
                    # The AgentCenter's unmarshal fails and it drops the stream: do the same.
                    self.store.count_decode_error()
                    stream.queue.put_nowait(_DISCONNECT)
                    return
                _, first_heartbeat = self.store.add_package(raw, decoded, stream.id)
                if first_heartbeat and self._configs is not None:
                    stream.queue.put_nowait(self._configs)
                if self.read_rate:
                    # The next message is read once this one's records have taken their time.
                    due = max(due, time.monotonic()) + len(decoded.records) / self.read_rate
                    await asyncio.sleep(due - time.monotonic())
        finally:
            stream.queue.put_nowait(None)

    async def _upload(
        self,
        request_iterator: AsyncIterator[grpc_pb2.FileUploadRequest],
        context: grpc.aio.ServicerContext,
    ) -> grpc_pb2.FileUploadResponse:
        call_id = f"upload-{next(self._ids)}"
        async for chunk in request_iterator:
            self.store.add_upload_chunk(call_id, chunk.token, chunk.data)
        self.store.finish_upload(call_id)
        return grpc_pb2.FileUploadResponse(status=self.upload_status)
