"""The record a bench plugin writes, as plugin source text the benches embed.

`FRAME_CODE` defines, inside a plugin script, `head` and `tail`: a `u32 LE length` + Record
frame of RECORD_BYTES bytes (data_type 9999, 300 by default) cut around a 10-digit `seq`, so
`head + b"%010d" % n + tail` is frame number n.
"""

FRAME_CODE = r"""
import os

def varint(n):
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)

def field(key, data):
    return bytes((key,)) + varint(len(data)) + data

def entry(k, v):
    return field(0x0A, field(0x0A, k) + field(0x12, v))

def record(pad):
    payload = entry(b"seq", b"0123456789") + entry(b"exe", b"/usr/bin/bench")
    payload += entry(b"pad", b"p" * pad)
    return b"\x08\x8fN" + b"\x10" + varint(1764168000) + field(0x1A, payload)

pad = 200
size = int(os.environ.get("RECORD_BYTES", "300"))
while len(record(pad)) != size:
    pad += size - len(record(pad))
body = record(pad)
frame = len(body).to_bytes(4, "little") + body
cut = frame.index(b"0123456789")
head, tail = frame[:cut], frame[cut + 10:]
"""
