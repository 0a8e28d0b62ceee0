"""The spool's bytes: entries in segment files and the checkpoint, as pure functions.

An entry is one run of spliced records of one buffer lane:

    magic u8 (0xE5) | lane u8 | count u32 | time u32 | length u32 | payload crc32 u32
    | header crc32 u32 (over the 18 bytes before it) | payload (length bytes)

little-endian. The header has its own CRC so that a scan can trust a length before reading
the payload, and can resynchronise after damage by looking for the next magic byte whose
header checks out. A torn tail, flipped bits or zeroes from a crash cost the damaged
entries only: `scan` returns every intact entry and counts each damaged region once.

The checkpoint names the first entry not yet delivered, and the end of those after it that
were written to a stream (perhaps delivered, the rest never left the spool): segment id u64 |
offset u64 | end segment id u64 | end offset u64 | crc32. The older form without the end
(20 bytes) still reads, with the end at the first entry.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from elkeid_agent.wire import MAX_MESSAGE_BYTES

MAGIC = 0xE5
_HEAD = struct.Struct("<BBIIII")
_HEAD_CRC = struct.Struct("<I")
HEADER_BYTES = _HEAD.size + _HEAD_CRC.size
_CHECKPOINT = struct.Struct("<QQQQ")
CHECKPOINT_BYTES = _CHECKPOINT.size + 4
_CHECKPOINT_V1 = struct.Struct("<QQ")
MAX_LANE = 2
#: Largest payload an entry may hold: it must fit one message with its header. A header
#: announcing more is damage.
MAX_PAYLOAD = MAX_MESSAGE_BYTES - 64 * 1024


@dataclass(frozen=True, slots=True)
class EntryHead:
    """An intact entry found in a segment: where it is and what it holds."""

    offset: int
    lane: int
    count: int
    time: int
    length: int  # payload bytes

    @property
    def size(self) -> int:
        return HEADER_BYTES + self.length

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True, slots=True)
class ScanResult:
    entries: list[EntryHead]
    corrupt: int  # damaged regions, each counted once
    corrupt_bytes: int


def encode_entry(lane: int, count: int, time: int, payload: bytes) -> bytes:
    head = _HEAD.pack(MAGIC, lane, count, time & 0xFFFFFFFF, len(payload), zlib.crc32(payload))
    return head + _HEAD_CRC.pack(zlib.crc32(head)) + payload


def decode_head(data: bytes | memoryview, pos: int) -> EntryHead | None:
    """The header at `pos` if it is whole and its CRC holds (the payload is not checked)."""
    if pos < 0 or pos + HEADER_BYTES > len(data):
        return None
    raw = bytes(data[pos : pos + _HEAD.size])
    magic, lane, count, time, length, _crc = _HEAD.unpack(raw)
    (head_crc,) = _HEAD_CRC.unpack_from(data, pos + _HEAD.size)
    if magic != MAGIC or zlib.crc32(raw) != head_crc or lane > MAX_LANE or length > MAX_PAYLOAD:
        return None
    return EntryHead(pos, lane, count, time, length)


def payload_ok(data: bytes | memoryview, head: EntryHead) -> bool:
    """Whether the payload after `head` is all there and matches its CRC."""
    start = head.offset + HEADER_BYTES
    if start + head.length > len(data):
        return False
    (crc,) = struct.unpack_from("<I", data, head.offset + 14)
    return bool(zlib.crc32(data[start : start + head.length]) == crc)


def decode_entry(data: bytes) -> tuple[EntryHead, bytes] | None:
    """One whole entry (as written, or read back at its offset), or None if damaged."""
    head = decode_head(data, 0)
    if head is None or len(data) != head.size or not payload_ok(data, head):
        return None
    return head, data[HEADER_BYTES:]


def scan(data: bytes, start: int = 0) -> ScanResult:
    """Every intact entry of a segment from `start`, oldest first, and the damage counted."""
    view = memoryview(data)
    entries: list[EntryHead] = []
    corrupt = corrupt_bytes = 0
    pos = start
    damaged_from = -1
    while pos < len(data):
        head = decode_head(view, pos)
        if head is not None and payload_ok(view, head):
            if damaged_from >= 0:
                corrupt += 1
                corrupt_bytes += pos - damaged_from
                damaged_from = -1
            entries.append(head)
            pos = head.end
            continue
        if damaged_from < 0:
            damaged_from = pos
        if head is not None and head.end <= len(data):
            pos = head.end  # the header is sound, so only this payload is lost
            continue
        nxt = data.find(MAGIC.to_bytes(1, "little"), pos + 1)
        pos = len(data) if nxt < 0 else nxt
    if damaged_from >= 0:
        corrupt += 1
        corrupt_bytes += len(data) - damaged_from
    return ScanResult(entries, corrupt, corrupt_bytes)


class Checkpoint(NamedTuple):
    segment: int
    offset: int
    #: Entries from (segment, offset) up to here were written to a stream: perhaps delivered.
    sent_end: tuple[int, int]


def encode_checkpoint(segment: int, offset: int, sent_end: tuple[int, int] | None = None) -> bytes:
    end = (segment, offset) if sent_end is None else sent_end
    body = _CHECKPOINT.pack(segment, offset, *end)
    return body + struct.pack("<I", zlib.crc32(body))


def decode_checkpoint(data: bytes) -> Checkpoint | None:
    for shape in (_CHECKPOINT, _CHECKPOINT_V1):
        if len(data) == shape.size + 4:
            body = data[: shape.size]
            if struct.unpack("<I", data[shape.size :])[0] != zlib.crc32(body):
                return None
            segment, offset, *end = shape.unpack(body)
            return Checkpoint(segment, offset, (end[0], end[1]) if end else (segment, offset))
    return None


def segment_name(segment: int) -> str:
    return f"{segment:016d}.seg"


def segment_id(name: str) -> int | None:
    stem, dot, ext = name.partition(".")
    if dot and ext == "seg" and len(stem) == 16 and stem.isdigit():
        return int(stem)
    return None


#: Bytes read at a time by `scan_reader`: start-up memory is bounded by this and one payload.
SCAN_CHUNK = 1024 * 1024


def scan_reader(read_at: Callable[[int, int], bytes], size: int) -> ScanResult:
    """`scan` over a file of `size` bytes read in SCAN_CHUNK pieces through `read_at(pos, n)`
    (which returns at most n bytes, fewer at the end): memory stays bounded whatever the file
    holds or its headers claim."""
    entries: list[EntryHead] = []
    corrupt = corrupt_bytes = 0
    damaged_from = -1
    buf = b""
    buf_at = 0

    def window(pos: int, n: int) -> bytes:
        nonlocal buf, buf_at
        if pos < buf_at or pos + n > buf_at + len(buf):
            buf_at, buf = pos, read_at(pos, max(n, SCAN_CHUNK))
        return buf[pos - buf_at : pos - buf_at + n]

    def payload_crc(start: int, length: int) -> int:
        crc = 0
        done = 0
        while done < length:
            piece = window(start + done, min(SCAN_CHUNK, length - done))
            if not piece:
                break
            crc = zlib.crc32(piece, crc)
            done += len(piece)
        return crc

    pos = 0
    while pos < size:
        raw = window(pos, HEADER_BYTES)
        head = decode_head(raw, 0)
        if head is not None and pos + head.size <= size:
            (want,) = struct.unpack_from("<I", raw, 14)
            if payload_crc(pos + HEADER_BYTES, head.length) == want:
                if damaged_from >= 0:
                    corrupt += 1
                    corrupt_bytes += pos - damaged_from
                    damaged_from = -1
                entries.append(EntryHead(pos, head.lane, head.count, head.time, head.length))
                pos += head.size
                continue
        if damaged_from < 0:
            damaged_from = pos
        if head is not None and pos + head.size <= size:
            pos += head.size  # the header is sound, so only this payload is lost
            continue
        pos += 1
        while pos < size:
            chunk = window(pos, min(SCAN_CHUNK, size - pos))
            found = chunk.find(MAGIC.to_bytes(1, "little"))
            if found >= 0:
                pos += found
                break
            pos += len(chunk) if chunk else size
    if damaged_from >= 0:
        corrupt += 1
        corrupt_bytes += size - damaged_from
    return ScanResult(entries, corrupt, corrupt_bytes)
