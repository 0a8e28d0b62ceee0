"""tarstream: our tar header parser reads what tarfile writes, and checks every declared size
before reading it (issue 18)."""

from __future__ import annotations

import gzip
import io
import tarfile
import tracemalloc
from pathlib import Path

import pytest
from floods import long_name_bomb_tar_gz

from elkeid_agent.download import UnsafeArchive, extract_tar_gz
from elkeid_agent.tarstream import (
    BLOCK,
    DEPTH_CAP_COUNTER,
    HEADER_CAP_COUNTER,
    MAX_DEPTH,
    Member,
    TarReader,
    TarRefused,
    parse_pax,
)
from elkeid_agent.upgrade.artifact import BadArtifact, extract_candidate

MiB = 1024 * 1024
GiB = 1024 * MiB


def header(name: bytes, size: int, typeflag: bytes = b"0", mode: int = 0o644) -> bytes:
    """One ustar header block built by hand, so a test can declare any size."""
    block = bytearray(BLOCK)
    block[0 : len(name[:100])] = name[:100]
    block[100:108] = b"%07o\0" % mode
    block[108:116] = block[116:124] = b"0000000\0"
    if size < 8**11:
        block[124:136] = b"%011o\0" % size
    else:  # GNU base-256
        block[124:136] = b"\x80" + size.to_bytes(11, "big")
    block[136:148] = b"%011o\0" % 1_700_000_000
    block[156:157] = typeflag
    block[257:265] = b"ustar  \0"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def members(data: bytes, **kw: int) -> list[tuple[Member, bytes]]:
    reader = TarReader(io.BytesIO(data), max_members=kw.get("max_members", 1000),
                       member_counter="archive_member_cap")
    return [(m, b"".join(reader.body())) for m in reader]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reads_what_tarfile_writes(fmt: int) -> None:
    long_dir = "d" * 90 + "/" + "e" * 90  # ustar puts it in the prefix field
    entries = {
        "exe": (b"#!/bin/sh\n", 0o755),
        f"{long_dir}/f": (b"x" * 1000, 0o644),
        "sub/": (None, 0o755),
        "empty": (b"", 0o600),
    }
    if fmt != tarfile.USTAR_FORMAT:
        entries["n" * 300] = (b"long", 0o644)  # GNU L, or a pax path record
        entries["\u00e9t\u00e9"] = (b"utf8", 0o644)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, (data, mode) in entries.items():
            info = tarfile.TarInfo(name)
            info.mode = mode
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link")
        link.type = tarfile.SYMTYPE
        link.linkname = "l" * 200 if fmt != tarfile.USTAR_FORMAT else "exe"
        tar.addfile(link)
    got = members(buf.getvalue())
    expected = []
    for name, (data, mode) in entries.items():
        kind = "dir" if data is None else "file"
        expected.append((name.rstrip("/"), kind, data or b"", mode))
    assert [(m.name, m.kind, d, m.mode) for m, d in got[:-1]] == expected
    assert (got[-1][0].kind, got[-1][0].linkname) == ("symbolic link", link.linkname)


def test_a_long_name_header_declaring_a_gib_is_refused_unread() -> None:
    # Only the header and a little of the body exist: the declared size alone must refuse it.
    data = header(b"././@LongLink", GiB, b"L") + b"a" * MiB
    with pytest.raises(TarRefused, match=f"GNU long name header declares {GiB} bytes") as info:
        members(data)
    assert info.value.counter == HEADER_CAP_COUNTER


def test_a_pax_header_over_its_cap_is_refused_unread() -> None:
    with pytest.raises(TarRefused, match="pax header declares") as info:
        members(header(b"pax", 10 * MiB, b"x") + b"9" * MiB)
    assert info.value.counter == HEADER_CAP_COUNTER


def test_nesting_deeper_than_the_cap_is_refused_by_name() -> None:
    deep = "/".join(["a"] * 1500) + "/f"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(deep)
        tar.addfile(info, io.BytesIO(b""))
    reason = f"nested 1501 levels deep, over the {MAX_DEPTH} cap"
    with pytest.raises(TarRefused, match=reason) as refused:
        members(buf.getvalue())
    assert refused.value.counter == DEPTH_CAP_COUNTER
    buf = io.BytesIO()
    at_cap = "/".join(["a"] * (MAX_DEPTH - 1)) + "/f"
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(tarfile.TarInfo(at_cap), io.BytesIO(b""))
    assert members(buf.getvalue())[0][0].name == at_cap


def test_pax_records() -> None:
    assert parse_pax(b"16 path=abcdefg\n11 size=10\n") == {"path": "abcdefg", "size": "10"}
    for bad in (b"99 path=x\n", b"x path=y\n", b"9 pathx\n", b"10 path=ab"):
        with pytest.raises(TarRefused, match="malformed pax record"):
            parse_pax(bad)


def test_bad_checksum_and_truncation_are_named() -> None:
    block = bytearray(header(b"f", 10))
    block[0] = ord("g")
    with pytest.raises(TarRefused, match="bad header checksum"):
        members(bytes(block))
    with pytest.raises(TarRefused, match="truncated member data"):
        members(header(b"f", 1000) + b"x" * 10)


def _deep_tar_gz(tmp_path: Path, levels: int) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("/".join(["a"] * levels) + "/f")
        tar.addfile(info, io.BytesIO(b""))
    path = tmp_path / "deep.tar.gz"
    path.write_bytes(gzip.compress(buf.getvalue()))
    return path


def test_the_extractor_refuses_a_deep_member_with_its_counter(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(UnsafeArchive, match="levels deep") as info:
        extract_tar_gz(_deep_tar_gz(tmp_path, 1500), dest)
    assert info.value.counter == DEPTH_CAP_COUNTER
    assert list(dest.iterdir()) == []


@pytest.fixture(scope="module")
def gib_long_name() -> bytes:
    return long_name_bomb_tar_gz(GiB)


def test_the_extractor_and_the_upgrade_refuse_a_gib_long_name_in_bounded_memory(
    tmp_path: Path, gib_long_name: bytes
) -> None:
    archive = tmp_path / "x.tar.gz"
    archive.write_bytes(gib_long_name)
    dest = tmp_path / "out"
    dest.mkdir()
    tracemalloc.start()
    try:
        with pytest.raises(UnsafeArchive, match="GNU long name header declares") as info:
            extract_tar_gz(archive, dest)
        assert info.value.counter == HEADER_CAP_COUNTER
        with archive.open("rb") as src, pytest.raises(BadArtifact, match="GNU long name"):
            extract_candidate(src, io.BytesIO())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB, f"peak {peak / MiB:.1f} MiB"
