"""Archives made to exhaust an extractor: built fast, byte by byte, for the archive tests."""

from __future__ import annotations

import gzip
import tarfile

BLOCK = 512
#: ustar header fields this builder rewrites per member.
NAME = slice(0, 100)
CHKSUM = slice(148, 156)


def member_flood_tar_gz(count: int) -> bytes:
    """A tar.gz of `count` empty regular files named f000000, f000001, ...

    tarfile would take ~100 us per member to build this; one template header with the name
    and checksum patched per member takes a few.
    """
    template = bytearray(tarfile.TarInfo("f000000").tobuf(tarfile.USTAR_FORMAT))
    template[CHKSUM] = b" " * 8
    base = sum(template) - sum(template[NAME])
    headers = bytearray()
    for i in range(count):
        name = b"f%06d" % i
        header = bytearray(template)
        header[NAME] = name.ljust(100, b"\0")
        header[CHKSUM] = b"%06o\0 " % (base + sum(name))
        headers += header
    return gzip.compress(bytes(headers) + b"\0" * (2 * BLOCK), compresslevel=1)


def _header(name: bytes, size: int, typeflag: bytes) -> bytes:
    info = tarfile.TarInfo(name.decode())
    info.size = size
    info.type = typeflag
    return info.tobuf(tarfile.GNU_FORMAT)


def long_name_bomb_tar_gz(declared: int, tail: bytes = b"") -> bytes:
    """A GNU long-name header declaring `declared` bytes, that many bytes of 'a' as its body,
    then `tail` (more tar data, padded to a block) and the end blocks, gzipped: about
    1 MiB per GiB declared.

    Built as concatenated gzip members (one 16 MiB block compressed once and repeated), which
    every gzip reader takes as one stream: seconds faster than compressing the GiB.
    """
    block = 16 * 1024 * 1024
    assert declared % block == 0
    head = _header(b"././@LongLink", declared, tarfile.GNUTYPE_LONGNAME)
    padded = tail + b"\0" * (-len(tail) % BLOCK) + b"\0" * (2 * BLOCK)
    filler = gzip.compress(b"a" * block, compresslevel=9)
    return b"".join(
        [gzip.compress(head), filler * (declared // block), gzip.compress(padded)]
    )
