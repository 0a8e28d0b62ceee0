"""Issue 18: hostile tar headers against both extractors (plugin archives, self-upgrade
archives), with the memory each one takes asserted.

Hypothesis writes archives header by header: any typeflag (GNU long names and links, pax
and global pax headers, sparse, volume labels, bytes nobody defined), declared sizes from 0
to 2^88 (octal and GNU base-256), names of any length, pax records with long paths, bad sizes
and sparse keys, bodies shorter than declared, damaged checksums. Whatever comes, each
extractor either succeeds or raises its own refusal (never another exception), and the
Python heap it grows (tracemalloc's peak) stays under MEMORY_LIMIT, whatever size was
declared.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elkeid_agent.download import UnsafeArchive, extract_tar_gz
from elkeid_agent.upgrade.artifact import BadArtifact, extract_candidate

BLOCK = 512
MiB = 1024 * 1024
MEMORY_LIMIT = 4 * MiB
TYPEFLAGS = [b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"L", b"K", b"x", b"g",
             b"S", b"V", b"M", b"N"]


def _size_field(size: int) -> bytes:
    if size < 8**11:
        return b"%011o\0" % size
    return b"\x80" + (size % 256**11).to_bytes(11, "big")


def _header(name: bytes, size: int, typeflag: bytes, checksum_delta: int) -> bytes:
    block = bytearray(BLOCK)
    block[0 : min(len(name), 100)] = name[:100]
    block[100:108] = b"0000755\0"
    block[124:136] = _size_field(size)
    block[156:157] = typeflag
    block[257:263] = b"ustar\0"
    block[263:265] = b"00"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % ((sum(block) + checksum_delta) % 8**6)
    return bytes(block)


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length).encode()) + len(body) != length:
        length += 1
    return str(length).encode() + body


names = st.one_of(
    st.sampled_from([b"elkeid-agent", b"./etc/elkeid/elkeid-agent", b"p", b"d/", b"a/../b"]),
    st.binary(max_size=120),
    st.integers(1, 2000).map(lambda n: b"/".join([b"a"] * n)),
)
sizes = st.one_of(
    st.integers(0, 4096),
    st.integers(0, 2**40),
    st.integers(2**33, 2**88),
)
pax_bodies = st.lists(
    st.one_of(
        st.tuples(st.just(b"path"), names),
        st.tuples(st.just(b"path"), st.integers(0, 10_000).map(lambda n: b"x" * n)),
        st.tuples(st.just(b"linkpath"), names),
        st.tuples(st.just(b"size"), st.one_of(st.binary(max_size=30), st.integers(-5, 2**70).map(
            lambda n: str(n).encode()))),
        st.tuples(st.just(b"GNU.sparse.major"), st.just(b"1")),
    ),
    max_size=4,
).map(lambda records: b"".join(_pax_record(k, v) for k, v in records))


@st.composite
def entries(draw: st.DrawFn) -> bytes:
    typeflag = draw(st.one_of(st.sampled_from(TYPEFLAGS), st.binary(min_size=1, max_size=1)))
    if typeflag in (b"x", b"g") and draw(st.booleans()):
        data = draw(pax_bodies)
        size = draw(st.one_of(st.just(len(data)), sizes))
    elif typeflag in (b"L", b"K") and draw(st.booleans()):
        data = draw(names) + b"\0"
        size = draw(st.one_of(st.just(len(data)), sizes))
    else:
        size = draw(sizes)
        data = draw(st.binary(max_size=2048))
    # A body as declared when it is small, else whatever was drawn (shorter than declared).
    if size <= 4096 and draw(st.booleans()):
        data = (data + b"\0" * size)[:size]
    checksum_delta = draw(st.sampled_from([0, 0, 0, 1]))
    name = draw(names)
    return _header(name, size, typeflag, checksum_delta) + data + b"\0" * (-len(data) % BLOCK)


archives = st.lists(entries(), min_size=1, max_size=5).map(
    lambda parts: b"".join(parts) + b"\0" * (2 * BLOCK)
)


def _peak(fn: Callable[[], None]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(archives)
def test_hostile_headers_are_refused_in_bounded_memory(tar: bytes) -> None:
    packed = gzip.compress(tar, compresslevel=1)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "a.tar.gz"
        archive.write_bytes(packed)
        dest = Path(tmp) / "out"
        dest.mkdir()

        def plugin() -> None:
            with contextlib.suppress(UnsafeArchive):
                extract_tar_gz(archive, dest, max_bytes=64 * MiB)

        def upgrade() -> None:
            with contextlib.suppress(BadArtifact):
                extract_candidate(io.BytesIO(packed), io.BytesIO(), max_bytes=64 * MiB)

        for extractor in (plugin, upgrade):
            peak = _peak(extractor)
            assert peak < MEMORY_LIMIT, f"{extractor.__name__}: {peak / MiB:.1f} MiB"
