"""What the center has received, kept in memory and readable from any thread.

The gRPC handlers run on the center's event loop while tests read from the pytest
thread, so every access goes through one lock and readers get immutable snapshots.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from google.protobuf.message import DecodeError

from elkeid_agent._proto import grpc_pb2


@dataclass(frozen=True)
class DecodedRecord:
    """One EncodedRecord of a PackagedData, with its Payload decoded.

    `raw` is the record's `data` field exactly as sent (the encoded Payload), so tests
    can check byte-for-byte pass-through. When `raw` is not a valid Payload, `fields`
    is empty and `payload_ok` is False.
    """

    data_type: int
    timestamp: int
    fields: dict[str, str]
    raw: bytes
    connection: int = 0
    recv_time: float = 0.0
    payload_ok: bool = True


class ReceivedPackage(NamedTuple):
    """One Transfer message: the bytes as received, their decoding, the arrival time."""

    raw: bytes
    decoded: grpc_pb2.PackagedData
    recv_time: float


@dataclass(frozen=True)
class ConnectionInfo:
    """One Transfer stream. `agent_id` comes from its first PackagedData."""

    id: int
    peer: str
    opened_at: float
    closed_at: float | None = None
    agent_id: str = ""
    packages: int = 0
    first_heartbeat_at: float | None = None


@dataclass(frozen=True)
class Upload:
    """One FileExt.Upload call: the data, and when each chunk arrived (for rate checks)."""

    token: str
    data: bytes
    chunk_times: tuple[float, ...]
    chunk_sizes: tuple[int, ...]
    complete: bool


@dataclass
class _UploadState:
    token: str
    data: bytearray = field(default_factory=bytearray)
    chunk_times: list[float] = field(default_factory=list)
    chunk_sizes: list[int] = field(default_factory=list)
    complete: bool = False

    def snapshot(self) -> Upload:
        return Upload(
            self.token,
            bytes(self.data),
            tuple(self.chunk_times),
            tuple(self.chunk_sizes),
            self.complete,
        )


def decode_records(
    package: grpc_pb2.PackagedData, connection: int = 0, recv_time: float = 0.0
) -> list[DecodedRecord]:
    """Decode every record's Payload (the server side of the zero-decode splice)."""
    out = []
    for rec in package.records:
        payload = grpc_pb2.Payload()
        try:
            payload.ParseFromString(rec.data)
            fields, ok = dict(payload.fields), True
        except DecodeError:
            fields, ok = {}, False
        out.append(
            DecodedRecord(rec.data_type, rec.timestamp, fields, rec.data, connection, recv_time, ok)
        )
    return out


PackageListener = Callable[[ReceivedPackage, ConnectionInfo, list[DecodedRecord]], None]
UploadListener = Callable[[Upload], None]

#: What the agent's own records and the SDK demo plugin's records are (PROTOCOL.md section 3).
RECORD_NAMES = {
    1000: "heartbeat",
    1001: "plugin heartbeat",
    1010: "log",
    5100: "task result",
    5998: "demo task reply",
    5999: "demo tick",
}


def record_name(data_type: int) -> str:
    """`1000 heartbeat`, or the bare number for a type this center has no name for."""
    name = RECORD_NAMES.get(data_type)
    return f"{data_type} {name}" if name else str(data_type)


class Store:
    """Thread-safe record of packages, records, connections and uploads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._packages: list[tuple[ReceivedPackage, int]] = []
        self._records: list[DecodedRecord] = []
        self._connections: dict[int, ConnectionInfo] = {}
        self._uploads: dict[str, _UploadState] = {}
        self._listeners: list[PackageListener] = []
        self._upload_listeners: list[UploadListener] = []
        self.decode_errors = 0
        #: Data types decoded and counted (`counted`) but not kept: a flood's records would
        #: fill the test process's memory.
        self.count_only: frozenset[int] = frozenset()
        self._counted: dict[int, int] = {}

    def add_listener(self, listener: PackageListener) -> None:
        """Call `listener` (on the receiving thread) for each package, after it is stored."""
        with self._lock:
            self._listeners.append(listener)

    def add_upload_listener(self, listener: UploadListener) -> None:
        """Call `listener` (on the receiving thread) with each upload once it is complete."""
        with self._lock:
            self._upload_listeners.append(listener)

    # --- connections -------------------------------------------------------------

    def open_connection(self, conn_id: int, peer: str) -> ConnectionInfo:
        info = ConnectionInfo(conn_id, peer, time.time())
        with self._lock:
            self._connections[conn_id] = info
        return info

    def close_connection(self, conn_id: int) -> None:
        with self._lock:
            info = self._connections[conn_id]
            self._connections[conn_id] = replace(info, closed_at=time.time())

    def connections(self) -> list[ConnectionInfo]:
        with self._lock:
            return list(self._connections.values())

    def connection(self, conn_id: int) -> ConnectionInfo:
        with self._lock:
            return self._connections[conn_id]

    # --- packages ----------------------------------------------------------------

    def count_decode_error(self) -> None:
        with self._lock:
            self.decode_errors += 1

    def add_package(
        self, raw: bytes, decoded: grpc_pb2.PackagedData, conn_id: int
    ) -> tuple[ReceivedPackage, bool]:
        """Store one message. Returns it and whether it carried the connection's first
        agent heartbeat (data_type 1000), the AgentCenter's trigger for pushing Configs."""
        now = time.time()
        package = ReceivedPackage(raw, decoded, now)
        records = decode_records(decoded, conn_id, now)
        with self._lock:
            info = self._connections[conn_id]
            first_heartbeat = info.first_heartbeat_at is None and any(
                r.data_type == 1000 for r in records
            )
            info = replace(
                info,
                agent_id=info.agent_id or decoded.agent_id,
                packages=info.packages + 1,
                first_heartbeat_at=now if first_heartbeat else info.first_heartbeat_at,
            )
            self._connections[conn_id] = info
            kept = [r for r in records if r.data_type not in self.count_only]
            for r in records:
                if r.data_type in self.count_only:
                    self._counted[r.data_type] = self._counted.get(r.data_type, 0) + 1
            if kept or not records:
                self._packages.append((package, conn_id))
            self._records.extend(kept)
            listeners = list(self._listeners)
        for listener in listeners:
            listener(package, info, records)
        return package, first_heartbeat

    def packaged(self, connection: int | None = None) -> list[ReceivedPackage]:
        with self._lock:
            return [p for p, c in self._packages if connection is None or c == connection]

    def records(
        self, data_type: int | None = None, connection: int | None = None
    ) -> list[DecodedRecord]:
        with self._lock:
            return [
                r
                for r in self._records
                if (data_type is None or r.data_type == data_type)
                and (connection is None or r.connection == connection)
            ]

    def counted(self, data_type: int) -> int:
        """Records of a `count_only` type received so far."""
        with self._lock:
            return self._counted.get(data_type, 0)

    def clear(self) -> None:
        """Forget packages, records and uploads (connections stay: they are live state)."""
        with self._lock:
            self._packages.clear()
            self._records.clear()
            self._uploads.clear()
            self._counted.clear()
            self.decode_errors = 0

    # --- uploads -----------------------------------------------------------------

    def add_upload_chunk(self, call_id: str, token: str, data: bytes) -> None:
        with self._lock:
            state = self._uploads.get(call_id)
            if state is None:
                state = self._uploads[call_id] = _UploadState(token)
            state.data += data
            state.chunk_times.append(time.time())
            state.chunk_sizes.append(len(data))

    def finish_upload(self, call_id: str) -> None:
        with self._lock:
            state = self._uploads.get(call_id)
            if state is None:
                return
            state.complete = True
            upload = state.snapshot()
            listeners = list(self._upload_listeners)
        for listener in listeners:
            listener(upload)

    def uploads(self) -> dict[str, Upload]:
        """Uploads by token; a token used by several calls maps to the latest one."""
        with self._lock:
            return {s.token: s.snapshot() for s in self._uploads.values()}
