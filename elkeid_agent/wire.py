"""Protobuf wire format without protobuf objects on the hot path (PROTOCOL.md sections 1 and 5).

Everything here is sans-IO: plain functions and small state machines over bytes.

* Plugin frames (`u32 LE length` + encoded Record) are reassembled by `FrameDecoder`, and each
  frame is validated as a Record encoding (any field order, absent fields, unknown fields) before
  it may be spliced verbatim into a PackagedData. The Go agent assumed field order and crashed or
  corrupted data on valid frames; we accept every valid encoding and drop only malformed ones.
* `splice_records` builds PackagedData field 1 by prefixing each record with `0x0a <varint len>`:
  an encoded Record is, byte for byte, a valid EncodedRecord.
* `encode_header` encodes PackagedData fields 2..9 once; callers cache the bytes.
* `encode_record` / `encode_task` produce the same bytes as the Go (gogofaster) encoders: fields in
  ascending order, zero values omitted, map entries always carry key and value, negative int32
  sign-extended to ten bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import overload

from google.protobuf.message import DecodeError

from elkeid_agent import framescan
from elkeid_agent._proto.shape_pb2 import RecordTopBatch
from elkeid_agent.framescan import encode_varint, record_prefix

#: A PackagedData must stay under the server's 10 MiB limit; we keep 2 MiB of headroom.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
#: Room kept for the header (agent id, IP lists, hostname...) within a message.
HEADER_RESERVE = 64 * 1024
#: Largest plugin frame accepted by default: a record must fit in one message with its prefix.
DEFAULT_MAX_FRAME = MAX_MESSAGE_BYTES - HEADER_RESERVE - 16
#: A frame this long that spans reads is spliced on its own, in one copy (`_finish_held`);
#: shorter ones join the read's other frames, as one copy more costs little for them.
LONG_FRAME = 1024 * 1024

_U64 = (1 << 64) - 1
_LEN_PREFIX = struct.Struct("<I")

# The frame scan and whether it proves records plain: compiled, the proof is cheaper than the
# batch parse of `_valid_batch`; as Python source it is not. The tests run both ways.
_scan = framescan.scan
_prove = framescan.compiled()

# Wire types.
VARINT, I64, LEN, I32 = 0, 1, 2, 5


class WireError(ValueError):
    """Bytes that are not a valid encoding of the expected message."""


class FrameTooLarge(WireError):
    """A frame length beyond the cap: the pipe's framing can no longer be trusted.

    `frames` holds the valid frames that the same feed() completed before the bad length,
    so a caller can still deliver them.
    """

    def __init__(self, message: str, frames: Frames | None = None) -> None:
        super().__init__(message)
        self.frames: Frames = frames if frames is not None else Frames()


class Frames(Sequence[bytes]):
    """Valid Record frames from one pipe read, held as PackagedData field-1 bytes.

    `spliced` is what PackagedData field 1 holds for these records; the decoder builds it while
    it scans the read, and the buffer and the sender pass it along without touching each record
    again. The records themselves are cut out only when someone asks for them (tests, the slow
    validation path).
    """

    __slots__ = ("_count", "_records", "spliced")

    def __init__(self, frames: Sequence[bytes] = ()) -> None:
        self._records: list[bytes] | None = list(frames)
        self._count = len(self._records)
        self.spliced = splice_records(self._records, b"")

    @classmethod
    def from_spliced(cls, spliced: bytes, count: int) -> Frames:
        frames = cls.__new__(cls)
        frames._records, frames._count, frames.spliced = None, count, spliced
        return frames

    def _list(self) -> list[bytes]:
        if self._records is None:
            self._records = unsplice(self.spliced)
        return self._records

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...

    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        return self._list()[index]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._list())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Frames):
            return self.spliced == other.spliced
        if isinstance(other, list):
            return self._list() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Frames({self._list()!r})"


def decode_varint(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    """Decode a varint at `pos`, never reading at or past `end`; returns (value, next position)."""
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            # Bits beyond 64 are dropped, as upb and gogo do: strictness here would make a
            # frame's fate depend on the batch check or the per-frame walk.
            return result & _U64, pos
        shift += 7
        if shift > 63:
            raise WireError("varint longer than ten bytes")


#: Wire types 3 and 4 (deprecated groups) may still appear as unknown fields; every parser
#: involved (upb, gogo) skips them, so we do, nesting at most this deep.
_GROUP_START, _GROUP_END = 3, 4
MAX_GROUP_DEPTH = 32


def _skip_field(
    buf: bytes | memoryview, pos: int, end: int, wire_type: int, number: int = 0, depth: int = 0
) -> int:
    if wire_type == VARINT:
        return decode_varint(buf, pos, end)[1]
    if wire_type == LEN:
        length, pos = decode_varint(buf, pos, end)
        pos += length
    elif wire_type == I64:
        pos += 8
    elif wire_type == I32:
        pos += 4
    elif wire_type == _GROUP_START and depth < MAX_GROUP_DEPTH:
        while True:
            inner, inner_type, pos = _tag(buf, pos, end)
            if inner_type == _GROUP_END:
                if inner != number:
                    raise WireError(f"group {number} closed as {inner}")
                return pos
            pos = _skip_field(buf, pos, end, inner_type, inner, depth + 1)
    else:
        raise WireError(f"unexpected wire type {wire_type}")
    if pos > end:
        raise WireError("field runs past the end of the message")
    return pos


def _tag(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int, int]:
    key, pos = decode_varint(buf, pos, end)
    number = key >> 3
    if number == 0 or number > 0x1FFFFFFF:
        raise WireError(f"invalid field number {number}")
    return number, key & 7, pos


def check_record(buf: bytes | memoryview) -> None:
    """Raise WireError unless `buf` is a well-formed Record (or EncodedRecord) encoding.

    Strict where the server is: a known field with the wrong wire type makes the Go server
    reject the whole PackagedData, so such a record must never be forwarded. The payload (field
    3) is opaque bytes here, as in the server's EncodedRecord: only its length is checked.
    """
    end = len(buf)
    pos = 0
    while pos < end:
        number, wire_type, pos = _tag(buf, pos, end)
        if number in (1, 2):
            if wire_type != VARINT:
                raise WireError(f"Record field {number} has wire type {wire_type}")
            pos = decode_varint(buf, pos, end)[1]
        elif number == 3:
            if wire_type != LEN:
                raise WireError(f"Record field 3 has wire type {wire_type}")
            length, pos = decode_varint(buf, pos, end)
            data_end = pos + length
            if data_end > end:
                raise WireError("Record data runs past the end of the frame")
            pos = data_end
        else:
            pos = _skip_field(buf, pos, end, wire_type, number)


def record_header(buf: bytes | memoryview) -> tuple[int, int]:
    """(data_type, timestamp) of a valid Record encoding, proto3 defaults when absent."""
    end = len(buf)
    pos = 0
    data_type = timestamp = 0
    while pos < end:
        number, wire_type, pos = _tag(buf, pos, end)
        if number in (1, 2) and wire_type == VARINT:
            value, pos = decode_varint(buf, pos, end)
            if number == 1:
                data_type = _as_int32(value)
            else:
                timestamp = value - (1 << 64) if value >> 63 else value
        else:
            pos = _skip_field(buf, pos, end, wire_type, number)
    return data_type, timestamp


def _as_int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >> 31 else value


@dataclass
class FrameDecoder:
    """Reassembles `u32 LE length + Record` frames from pipe reads.

    `feed()` returns the valid frames completed by the new bytes and counts malformed ones.
    A length beyond `max_frame` raises FrameTooLarge: the stream cannot be trusted after that.
    """

    max_frame: int = DEFAULT_MAX_FRAME
    malformed: int = 0
    frames: int = 0
    _held: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> Frames:
        parts: list[bytes] = []
        count = unproven = pos = 0
        head: Frames | None = None
        max_frame = self.max_frame
        held = self._held
        if held:
            # Finish the frame an earlier read began (one copy of that frame only), then scan
            # the read itself. A long frame accumulates in place, however many reads it takes.
            if len(held) < 4:
                pos = min(4 - len(held), len(data))
                held += data[:pos]
                if len(held) < 4:
                    return Frames.from_spliced(b"", 0)
            (length,) = _LEN_PREFIX.unpack_from(held)
            if length > max_frame:
                raise FrameTooLarge(f"frame length {length} exceeds the cap of {max_frame}")
            need = 4 + length - len(held)
            if need > len(data) - pos:
                held += memoryview(data)[pos:]
                return Frames.from_spliced(b"", 0)
            held += memoryview(data)[pos : pos + need]
            pos += need
            self._held = bytearray()
            if length < LONG_FRAME:
                _, count, unproven, _ = _scan(bytes(held), 0, max_frame, parts, _prove)
            else:
                head = self._finish_held(held, length)
            del held  # a frame of up to max_frame bytes: never held twice for long
        pos, more, more_unproven, bad_length = _scan(data, pos, max_frame, parts, _prove)
        count += more
        unproven += more_unproven
        if bad_length < 0 and pos < len(data):
            self._held = bytearray(memoryview(data)[pos:])
        frames = self._validate(parts, count, unproven)
        if head is not None and len(head):
            frames = head if not len(frames) else Frames.from_spliced(
                head.spliced + frames.spliced, len(head) + len(frames))
        self.frames += len(frames)
        if bad_length >= 0:
            raise FrameTooLarge(
                f"frame length {bad_length} exceeds the cap of {max_frame}", frames
            )
        return frames

    def _finish_held(self, held: bytearray, length: int) -> Frames:
        """The long frame an earlier read began, now whole in `held`: spliced in one copy
        (the prefix and the record; a frame may be 8 MiB, and every copy of it counts)."""
        prefix = record_prefix(length)
        spliced = b"".join((prefix, memoryview(held)[4:]))
        if _prove and framescan.plain_record(spliced, len(prefix), len(spliced)):
            return Frames.from_spliced(spliced, 1)
        return self._validate([spliced], 1, 1)

    def _validate(self, parts: list[bytes], count: int, unproven: int) -> Frames:
        if not count:
            return Frames.from_spliced(b"", 0)
        spliced = b"".join(parts)
        if not unproven or _valid_batch(spliced):
            return Frames.from_spliced(spliced, count)
        valid = []
        for frame in unsplice(spliced):
            try:
                check_record(frame)
            except WireError:
                self.malformed += 1
                continue
            valid.append(frame)
        return Frames(valid)

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back for the next read."""
        return len(self._held)


def _valid_batch(spliced: bytes) -> bool:
    """True if one C-speed parse proves every record of the batch valid.

    The top-level parse, with unknown fields dropped and the re-encoded size compared, proves
    that Record fields 1..3 have their declared wire types and lengths within bounds: a mistyped
    field would be kept as an unknown field and change the size. Any doubt (also a merely
    non-canonical encoding, or an unknown top-level field) sends the batch to `check_record`,
    which applies the same rule frame by frame.
    """
    try:
        top = RecordTopBatch.FromString(spliced)
    except DecodeError:
        return False
    top.DiscardUnknownFields()
    return bool(top.ByteSize() == len(spliced))


def spliced_size(record: bytes) -> int:
    """Bytes a record takes inside PackagedData, prefix included."""
    n = len(record)
    return n + len(record_prefix(n))


def unsplice(spliced: bytes | memoryview) -> list[bytes]:
    """The records of PackagedData field-1 entries (the inverse of splice_records)."""
    out = []
    pos, end = 0, len(spliced)
    while pos < end:
        if spliced[pos] != 0x0A:
            raise WireError(f"not a field-1 entry at offset {pos}")
        length, pos = decode_varint(spliced, pos + 1, end)
        if pos + length > end:
            raise WireError("record runs past the end")
        out.append(bytes(spliced[pos : pos + length]))
        pos += length
    return out


def splice_records(records: Iterable[bytes], header: bytes) -> bytes:
    """Build a PackagedData from verbatim Record encodings and a pre-encoded header."""
    parts: list[bytes] = []
    append = parts.append
    for record in records:
        append(record_prefix(len(record)))
        append(record)
    append(header)
    return b"".join(parts)


def _len_field(number: int, payload: bytes) -> bytes:
    return encode_varint(number << 3 | LEN) + encode_varint(len(payload)) + payload


def _str_field(number: int, value: str) -> bytes:
    return _len_field(number, value.encode()) if value else b""


@dataclass(frozen=True)
class Header:
    """PackagedData fields 2..9: what identifies this host in every message."""

    agent_id: str
    intranet_ipv4: Sequence[str]
    extranet_ipv4: Sequence[str]
    intranet_ipv6: Sequence[str]
    extranet_ipv6: Sequence[str]
    hostname: str
    version: str
    product: str

    def encode(self) -> bytes:
        parts = [_str_field(2, self.agent_id)]
        for number, values in (
            (3, self.intranet_ipv4),
            (4, self.extranet_ipv4),
            (5, self.intranet_ipv6),
            (6, self.extranet_ipv6),
        ):
            parts.extend(_len_field(number, v.encode()) for v in values)
        parts += (
            _str_field(7, self.hostname),
            _str_field(8, self.version),
            _str_field(9, self.product),
        )
        return b"".join(parts)


def _varint_field(number: int, value: int) -> bytes:
    return encode_varint(number << 3 | VARINT) + encode_varint(value) if value else b""


def encode_payload(fields: Mapping[str, str]) -> bytes:
    """Payload{map<string,string> fields = 1}; entries always carry key and value, like Go's."""
    parts = []
    for key, value in fields.items():
        k = key.encode()
        v = value.encode()
        entry = b"\x0a" + encode_varint(len(k)) + k + b"\x12" + encode_varint(len(v)) + v
        parts.append(b"\x0a" + encode_varint(len(entry)) + entry)
    return b"".join(parts)


def encode_record(data_type: int, timestamp: int, fields: Mapping[str, str]) -> bytes:
    """A Record encoding (what a plugin writes, and what the agent's own records are)."""
    return (
        _varint_field(1, data_type)
        + _varint_field(2, timestamp)
        + _len_field(3, encode_payload(fields))
    )


def encode_task(data_type: int, object_name: str, data: str, token: str) -> bytes:
    """A Task encoding, byte-identical to the Go agent's for the same Task."""
    return (
        _varint_field(1, data_type)
        + _str_field(2, object_name)
        + _str_field(3, data)
        + _str_field(4, token)
    )


def task_frame(data_type: int, object_name: str, data: str, token: str) -> bytes:
    """The agent -> plugin pipe frame: u32 LE length + encoded Task, written in one write()."""
    body = encode_task(data_type, object_name, data, token)
    return _LEN_PREFIX.pack(len(body)) + body


def record_frame(record: bytes) -> bytes:
    """The plugin -> agent pipe frame for an encoded Record."""
    return _LEN_PREFIX.pack(len(record)) + record
