"""The per-frame loop of `wire.FrameDecoder`: every record a plugin writes passes here.

One pass over a pipe read cuts the `u32 LE length + Record` frames, puts each record behind
its PackagedData field-1 prefix (`0x0a <varint len>`) and, when asked, proves the record
plain: made only of fields 1 and 2 (varint) and 3 (bytes, within the frame) with one-byte
keys, which is how the Go and Rust plugin libraries encode every Record. A plain record is
valid for the server as it is; any other is left to the exact check (`wire.check_record`).

Builds compile this module with mypyc (`tools/compile_hot.py`, run by `make setup` and
build/build-in-root.sh): the loop then costs about 0.2 µs per record instead of 1.7. The same
source runs as plain Python when no compiled module is there, and the tests run both. It
imports nothing of ours, so that it compiles alone.
"""

from __future__ import annotations

from typing import Final


def encode_varint(value: int) -> bytes:
    """Encode an int as a protobuf varint; negatives are sign-extended to 64 bits (ten bytes).

    Here rather than in wire.py (which uses it) so that this module imports nothing of ours.
    """
    value &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


#: Prefixes for the common record sizes, computed once.
PREFIX_CACHE_SIZE: Final = 1 << 14
PREFIXES: Final[list[bytes]] = [b"\x0a" + encode_varint(n) for n in range(PREFIX_CACHE_SIZE)]


def record_prefix(length: int) -> bytes:
    """PackagedData field-1 key and length for a record of `length` bytes."""
    if length < PREFIX_CACHE_SIZE:
        return PREFIXES[length]
    return b"\x0a" + encode_varint(length)


def _skip_varint(buf: bytes, pos: int, end: int) -> int:
    """The position after the varint at `pos`, or -1 if it is cut off or over ten bytes."""
    limit = min(pos + 10, end)
    while pos < limit:
        if buf[pos] < 0x80:
            return pos + 1
        pos += 1
    return -1


def plain_record(buf: bytes, pos: int, end: int) -> bool:
    """True if `buf[pos:end]` is a plain Record (see the module doc); False: not proven."""
    while pos < end:
        key = buf[pos]
        if key in (0x08, 0x10):
            pos = _skip_varint(buf, pos + 1, end)
            if pos < 0:
                return False
        elif key == 0x1A:
            # The length, at most four bytes here: a longer one is left to the exact check.
            pos += 1
            length = 0
            shift = 0
            while True:
                if pos >= end or shift > 21:
                    return False
                byte = buf[pos]
                pos += 1
                length |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                shift += 7
            if length > end - pos:
                return False
            pos += length
        else:
            return False
    return True


def scan(
    buf: bytes, pos: int, max_frame: int, parts: list[bytes], prove: bool
) -> tuple[int, int, int, int]:
    """Cut the complete frames of `buf` from `pos`, appending prefix and record to `parts`.

    Returns (position after the last complete frame, frames cut, frames not proven plain,
    the length found beyond `max_frame` at that position or -1). Without `prove` no frame is
    proven. The scan stops at a length beyond `max_frame`: what follows cannot be trusted.
    """
    count = 0
    unproven = 0
    end = len(buf)
    while end - pos >= 4:
        length = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16) | (buf[pos + 3] << 24)
        if length > max_frame:
            return pos, count, unproven, length
        start = pos + 4
        stop = start + length
        if stop > end:
            break
        parts.append(PREFIXES[length] if length < PREFIX_CACHE_SIZE else record_prefix(length))
        parts.append(buf[start:stop])
        if not prove or not plain_record(buf, start, stop):
            unproven += 1
        pos = stop
        count += 1
    return pos, count, unproven, -1


def compiled() -> bool:
    """True when this module runs compiled (mypyc), not as Python source."""
    return not __file__.endswith(".py")
