"""The plugin side of the agent's pipes (PROTOCOL.md section 5).

fd 3: tasks from the agent, fd 4: records to the agent, fd 5: urgent records when the agent
sets ELKEID_PLUGIN_HIGH_PRIORITY_PIPE. Each frame is `u32 little-endian length` + protobuf.

Like the Go library, records go through a 512 KiB buffer flushed every 200 ms by a
background thread (and when full, and on flush()/close()); urgent records are written and
flushed at once. Encodings are byte-identical to the Go library's gogo-protobuf output for
the same map order: fields ascending, zero values omitted, map entries always carrying key
and value, negative int32 sign-extended. The files are injected, so tests need no processes.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO

TASK_FD = 3
RECORD_FD = 4
HIGH_PRIORITY_FD = 5
HIGH_PRIORITY_ENV = "ELKEID_PLUGIN_HIGH_PRIORITY_PIPE"
#: The Go library's bufio.Writer size and flush period.
WRITE_BUFFER_BYTES = 512 * 1024
FLUSH_INTERVAL = 0.2
#: The agent refuses frames above 8 MiB minus headroom; fail early with a clear error instead.
MAX_RECORD_BYTES = 8 * 1024 * 1024 - 64 * 1024 - 16
#: A task larger than this means the pipe is out of sync, not a real task.
MAX_TASK_BYTES = 64 * 1024 * 1024

_LEN = struct.Struct("<I")
_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class Task:
    data_type: int
    object_name: str
    data: str
    token: str


def _varint(value: int) -> bytes:
    value &= _U64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(key: int, payload: bytes) -> bytes:
    return bytes((key,)) + _varint(len(payload)) + payload


def encode_record(data_type: int, timestamp: int, fields: Mapping[str, str] | None) -> bytes:
    """Record{data_type=1, timestamp=2, data=3 Payload{map fields=1}}; None omits field 3."""
    out = bytearray()
    if data_type:
        out += b"\x08" + _varint(data_type)
    if timestamp:
        out += b"\x10" + _varint(timestamp)
    if fields is not None:
        payload = bytearray()
        for key, value in fields.items():
            entry = _len_field(0x0A, key.encode()) + _len_field(0x12, value.encode())
            payload += _len_field(0x0A, entry)
        out += _len_field(0x1A, bytes(payload))
    return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("bad varint in task")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def decode_task(buf: bytes) -> Task:
    """Decode an encoded Task; unknown fields are skipped, missing ones are zero."""
    values: dict[int, int | str] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
            if number == 1:
                value &= 0xFFFFFFFF
                values[1] = value - (1 << 32) if value >> 31 else value
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("task field runs past the frame")
            if number in (2, 3, 4):
                values[number] = buf[pos : pos + length].decode()
            pos += length
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"bad wire type {wire_type} in task")
    data_type, name, data, token = (values.get(i, 0 if i == 1 else "") for i in (1, 2, 3, 4))
    return Task(int(data_type), str(name), str(data), str(token))


class Client:
    """One plugin's connection to the agent.

    `record_file`, `task_file` and `high_priority_file` default to fds 4, 3 and (when the
    agent asks for it) 5. `flush_interval=None` disables the background flusher.
    """

    def __init__(
        self,
        record_file: BinaryIO | None = None,
        task_file: BinaryIO | None = None,
        high_priority_file: BinaryIO | None = None,
        *,
        flush_interval: float | None = FLUSH_INTERVAL,
    ) -> None:
        if record_file is None:
            record_file = os.fdopen(RECORD_FD, "wb", buffering=0)
            if high_priority_file is None and os.environ.get(HIGH_PRIORITY_ENV):
                high_priority_file = os.fdopen(HIGH_PRIORITY_FD, "wb", buffering=0)
        if task_file is None:
            # The Go library reads tasks through a 1 MiB buffer.
            task_file = os.fdopen(TASK_FD, "rb", buffering=1024 * 1024)
        self._records: BinaryIO = record_file
        self._tasks: BinaryIO = task_file
        self._urgent = high_priority_file
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._error: OSError | None = None
        self._closed = threading.Event()
        self._flusher: threading.Thread | None = None
        if flush_interval is not None:
            self._flusher = threading.Thread(
                target=self._flush_loop, args=(flush_interval,), name="elkeid-flush", daemon=True
            )
            self._flusher.start()

    def send_record(
        self,
        data_type: int,
        fields: Mapping[str, str] | None,
        timestamp: int | None = None,
        high_priority: bool = False,
    ) -> None:
        """Queue one record; `timestamp` defaults to now (unix seconds), 0 is sent as 0."""
        ts = int(time.time()) if timestamp is None else timestamp
        body = encode_record(data_type, ts, fields)
        if len(body) > MAX_RECORD_BYTES:
            raise ValueError(f"record of {len(body)} bytes exceeds {MAX_RECORD_BYTES}")
        frame = _LEN.pack(len(body)) + body
        with self._lock:
            self._raise_error()
            if high_priority:
                if self._urgent is not None:
                    self._write(self._urgent, frame)
                else:
                    self._buf += frame
                    self._flush_locked()
                return
            if len(self._buf) + len(frame) > WRITE_BUFFER_BYTES:
                self._flush_locked()
            if len(frame) >= WRITE_BUFFER_BYTES:
                self._write(self._records, frame)
            else:
                self._buf += frame

    def receive_task(self) -> Task:
        """Block until the agent sends a task; EOFError once the agent closed the pipe."""
        head = self._read_exactly(4)
        (length,) = _LEN.unpack(head)
        if length > MAX_TASK_BYTES:
            raise ValueError(f"task frame of {length} bytes: the pipe is out of sync")
        return decode_task(self._read_exactly(length))

    def flush(self) -> None:
        with self._lock:
            self._raise_error()
            self._flush_locked()

    def close(self) -> None:
        """Flush and close the pipes; the background flusher ends."""
        self._closed.set()
        if self._flusher is not None:
            self._flusher.join()
        with self._lock:
            try:
                if self._error is None:
                    self._flush_locked()
            finally:
                for f in (self._records, self._urgent, self._tasks):
                    if f is not None:
                        f.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------

    def _read_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self._tasks.read(n - len(data))
            if not chunk:
                raise EOFError("the agent closed the task pipe")
            data += chunk
        return data

    def _write(self, f: BinaryIO, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                written = f.write(view)
                view = view[written if written is not None else len(view) :]
            f.flush()
        except OSError as exc:
            self._error = exc
            raise

    def _flush_locked(self) -> None:
        if self._buf:
            data = bytes(self._buf)
            self._buf.clear()
            self._write(self._records, data)

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _flush_loop(self, interval: float) -> None:
        while not self._closed.wait(interval):
            with self._lock:
                if self._error is not None:
                    return
                try:
                    self._flush_locked()
                except OSError:
                    return  # kept in self._error: the next send_record raises it
