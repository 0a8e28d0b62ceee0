"""Find the agent executable inside whatever the server sent (pure: streams in, bytes out).

An artifact is one of:
* a bare executable (anything that is not one of the archives below; the probe decides);
* a gzip-compressed tar holding `elkeid-agent` or `etc/elkeid/elkeid-agent`;
* a .deb: an `ar` archive whose `data.tar`, `data.tar.gz`, `data.tar.xz` or `data.tar.bz2`
  holds `./etc/elkeid/elkeid-agent` (zstd, dpkg's newer default, has no stdlib decoder and
  is refused: our packages are gzip);
* an .rpm: lead, signature header, header (whose tag 1125 names the payload compressor),
  then a cpio `newc` payload compressed with gzip, xz/lzma or bzip2.

Done here rather than with dpkg-deb/rpm2cpio because the host may have neither (an .rpm on a
Debian host, a minimal image), and because only one member is wanted: nothing is written by
the names inside the archive, so traversal names cannot escape anywhere; they simply never
match. The wanted member must be a regular file (a link or device named like it is refused),
must appear once, and sizes are capped: the member, and everything decompressed on the way
to it (a decompression bomb ends at the cap); so is the number of members walked past.
"""

from __future__ import annotations

import bz2
import enum
import gzip
import lzma
import stat
import struct
import zlib
from pathlib import PurePosixPath
from typing import BinaryIO, Protocol, cast

from elkeid_agent.tarstream import TarReader, TarRefused, quote_name

#: The executable is ~25 MB; anything near this is not ours.
MAX_CANDIDATE_BYTES = 256 * 1024 * 1024
#: Bytes decompressed while looking for the member (a package holds little else).
MAX_UNPACKED_BYTES = 1024 * 1024 * 1024
#: Members walked past (tar, cpio, ar): our packages hold a handful, and an archive of
#: countless empty members must end early.
MAX_MEMBERS = 10_000
#: Heartbeat counters of the caps' breaches (`BadArtifact.counter`).
MEMBER_CAP_COUNTER = "archive_member_cap"
SIZE_CAP_COUNTER = "archive_size_cap"
#: rpm header index entries and data store; real packages use a few hundred entries and KiB.
MAX_RPM_INDEX = 100_000
MAX_RPM_STORE = 64 * 1024 * 1024
MAX_CPIO_NAME = 4096
CHUNK = 1024 * 1024

#: Where the executable sits in an archive ("." components ignored).
MEMBER_PATHS = (("etc", "elkeid", "elkeid-agent"), ("elkeid-agent",))

GZIP_MAGIC = b"\x1f\x8b"
AR_MAGIC = b"!<arch>\n"
RPM_MAGIC = b"\xed\xab\xee\xdb"
RPM_HEADER_MAGIC = b"\x8e\xad\xe8\x01"
RPM_LEAD_BYTES = 96
RPMTAG_PAYLOADFORMAT = 1124
RPMTAG_PAYLOADCOMPRESSOR = 1125
RPM_STRING_TYPE = 6
AR_HEADER_BYTES = 60
CPIO_HEADER_BYTES = 110
CPIO_MAGICS = (b"070701", b"070702")
CPIO_TRAILER = "TRAILER!!!"


class ArtifactKind(enum.StrEnum):
    BARE = "bare"
    TAR_GZ = "tar.gz"
    DEB = "deb"
    RPM = "rpm"


class BadArtifact(Exception):
    """The artifact does not hold a usable executable; the message says why, and `counter`
    names the heartbeat counter when a cap was breached."""

    def __init__(self, reason: str, counter: str | None = None) -> None:
        super().__init__(reason)
        self.counter = counter


def detect(head: bytes) -> ArtifactKind:
    """The artifact's kind from its first bytes (at least 8)."""
    if head.startswith(AR_MAGIC):
        return ArtifactKind.DEB
    if head.startswith(RPM_MAGIC):
        return ArtifactKind.RPM
    if head.startswith(GZIP_MAGIC):
        return ArtifactKind.TAR_GZ
    return ArtifactKind.BARE


def is_member_path(name: str) -> bool:
    """True for the archive names the executable may have (`./etc/elkeid/elkeid-agent`...)."""
    parts = tuple(p for p in PurePosixPath(name).parts if p != ".")
    return parts in MEMBER_PATHS


def extract_candidate(
    src: BinaryIO,
    out: BinaryIO,
    *,
    max_bytes: int = MAX_CANDIDATE_BYTES,
    max_unpacked: int = MAX_UNPACKED_BYTES,
) -> ArtifactKind:
    """Write the executable found in `src` (positioned at its start) to `out`."""
    kind = detect(src.read(8))
    src.seek(0)
    try:
        if kind is ArtifactKind.BARE:
            _copy(_Capped(src, max_bytes, "the executable"), out, None)
        elif kind is ArtifactKind.TAR_GZ:
            gz = gzip.GzipFile(fileobj=src, mode="rb")
            _from_tar(_Capped(gz, max_unpacked, "the unpacked archive"), out, max_bytes)
        elif kind is ArtifactKind.DEB:
            _from_deb(src, out, max_bytes, max_unpacked)
        else:
            _from_rpm(src, out, max_bytes, max_unpacked)
    except (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as exc:
        raise BadArtifact(f"{kind} artifact: {exc}") from exc
    except OSError as exc:
        # bz2 and a few gzip errors arrive as plain OSError.
        raise BadArtifact(f"{kind} artifact: {exc}") from exc
    return kind


# -- streams ---------------------------------------------------------------------------------


class Reader(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class _Capped:
    """A reader that fails once more than `cap` bytes came through it."""

    def __init__(self, stream: Reader, cap: int, what: str) -> None:
        self.stream = stream
        self.left = cap
        self.cap = cap
        self.what = what

    def read(self, n: int = -1) -> bytes:
        want = self.left + 1 if n < 0 else min(n, self.left + 1)
        data = self.stream.read(want)
        self.left -= len(data)
        if self.left < 0:
            raise BadArtifact(f"{self.what} is larger than {self.cap} bytes", SIZE_CAP_COUNTER)
        return data


class _Window:
    """The next `size` bytes of `src` as a stream (an ar member)."""

    def __init__(self, src: BinaryIO, size: int) -> None:
        self.src = src
        self.left = size

    def read(self, n: int = -1) -> bytes:
        want = self.left if n < 0 else min(n, self.left)
        data = self.src.read(want)
        self.left -= len(data)
        return data


def _read_exact(stream: Reader, n: int, what: str) -> bytes:
    parts: list[bytes] = []
    left = n
    while left > 0:
        block = stream.read(min(left, CHUNK))
        if not block:
            raise BadArtifact(f"truncated {what}")
        parts.append(block)
        left -= len(block)
    return b"".join(parts)


def _skip(stream: Reader, n: int, what: str) -> None:
    left = n
    while left > 0:
        left -= len(_read_exact(stream, min(left, CHUNK), what))


def _copy(stream: Reader, out: BinaryIO, size: int | None) -> None:
    """Copy `size` bytes (or to EOF when None) from `stream` to `out`."""
    if size is None:
        while block := stream.read(CHUNK):
            out.write(block)
        return
    left = size
    while left > 0:
        block = _read_exact(stream, min(left, CHUNK), "member")
        out.write(block)
        left -= len(block)


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise BadArtifact(
            f"the executable is {size} bytes, over the {max_bytes} byte cap", SIZE_CAP_COUNTER
        )


def _check_count(count: int, what: str) -> None:
    if count > MAX_MEMBERS:
        raise BadArtifact(f"{what} has more than {MAX_MEMBERS} members", MEMBER_CAP_COUNTER)


# -- tar ---------------------------------------------------------------------------------------


def _from_tar(stream: Reader, out: BinaryIO, max_bytes: int) -> None:
    found = False
    # One forward pass; tarstream checks each header's declared size before reading it.
    reader = TarReader(stream, max_members=MAX_MEMBERS, member_counter=MEMBER_CAP_COUNTER)
    try:
        for member in reader:
            if not is_member_path(member.name):
                continue
            if found:
                raise BadArtifact(f"{quote_name(member.name)} appears twice")
            if member.kind != "file":
                raise BadArtifact(f"{quote_name(member.name)} is a {member.kind}, not a file")
            _check_size(member.size, max_bytes)
            for block in reader.body():
                out.write(block)
            found = True
    except TarRefused as exc:
        raise BadArtifact(f"tar: {exc}", exc.counter) from exc
    if not found:
        raise BadArtifact("no elkeid-agent member in the archive")


# -- deb ---------------------------------------------------------------------------------------


def _from_deb(src: BinaryIO, out: BinaryIO, max_bytes: int, max_unpacked: int) -> None:
    _read_exact(src, len(AR_MAGIC), "ar archive")
    first = True
    count = 0
    while True:
        count += 1
        _check_count(count, "the deb")
        header = src.read(AR_HEADER_BYTES)
        if not header:
            raise BadArtifact("deb without data.tar")
        if len(header) != AR_HEADER_BYTES or header[58:60] != b"`\n":
            raise BadArtifact("deb: malformed ar member header")
        name = header[:16].decode("ascii", "replace").rstrip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise BadArtifact(f"deb: ar member {name!r} has a bad size") from None
        if first and name != "debian-binary":
            raise BadArtifact(f"deb: first member is {name!r}, not debian-binary")
        first = False
        if name.startswith("data.tar"):
            window = _Window(src, size)
            payload = _decompressor(name.removeprefix("data.tar").lstrip("."), window, "deb")
            _from_tar(_Capped(payload, max_unpacked, "data.tar"), out, max_bytes)
            return
        # ar pads every member to an even length.
        _skip(src, size + (size & 1), f"ar member {name!r}")


def _decompressor(compression: str, stream: Reader, where: str) -> Reader:
    if compression in ("", "none", "identity"):
        return stream
    # The decompressors only ever call read(); typeshed asks for a full file object.
    fileobj = cast(BinaryIO, stream)
    if compression in ("gz", "gzip"):
        return gzip.GzipFile(fileobj=fileobj, mode="rb")
    if compression in ("xz", "lzma"):
        return lzma.LZMAFile(fileobj)
    if compression in ("bz2", "bzip2"):
        return bz2.BZ2File(fileobj)
    raise BadArtifact(f"{where}: {compression} compression is not supported (gzip and xz are)")


# -- rpm ---------------------------------------------------------------------------------------


def _rpm_header(src: BinaryIO, what: str) -> tuple[list[tuple[int, int, int, int]], bytes]:
    """One header structure: its index entries (tag, type, offset, count) and data store."""
    intro = _read_exact(src, 16, f"rpm {what} header")
    if intro[:4] != RPM_HEADER_MAGIC:
        raise BadArtifact(f"rpm: bad {what} header magic")
    nindex, hsize = struct.unpack(">II", intro[8:16])
    if nindex > MAX_RPM_INDEX or hsize > MAX_RPM_STORE:
        raise BadArtifact(f"rpm: {what} header too large ({nindex} entries, {hsize} bytes)")
    raw = _read_exact(src, nindex * 16, f"rpm {what} index")
    entries = [struct.unpack_from(">IIII", raw, i * 16) for i in range(nindex)]
    store = _read_exact(src, hsize, f"rpm {what} data")
    return entries, store


def _rpm_string(entries: list[tuple[int, int, int, int]], store: bytes, tag: int) -> str | None:
    for entry_tag, kind, offset, _count in entries:
        if entry_tag != tag:
            continue
        end = store.find(b"\x00", offset)
        if kind != RPM_STRING_TYPE or offset >= len(store) or end < 0:
            raise BadArtifact(f"rpm: tag {tag} is not a string")
        return store[offset:end].decode("ascii", "replace")
    return None


def _from_rpm(src: BinaryIO, out: BinaryIO, max_bytes: int, max_unpacked: int) -> None:
    _read_exact(src, RPM_LEAD_BYTES, "rpm lead")
    _entries, sig_store = _rpm_header(src, "signature")
    # The signature header's data store is padded to a multiple of 8 bytes.
    _skip(src, -len(sig_store) % 8, "rpm signature padding")
    entries, store = _rpm_header(src, "main")
    payload_format = _rpm_string(entries, store, RPMTAG_PAYLOADFORMAT) or "cpio"
    if payload_format != "cpio":
        raise BadArtifact(f"rpm: payload format {payload_format!r} is not cpio")
    # rpm's historical default when the tag is absent.
    compressor = _rpm_string(entries, store, RPMTAG_PAYLOADCOMPRESSOR) or "gzip"
    payload = _decompressor(compressor, src, "rpm payload")
    _from_cpio(_Capped(payload, max_unpacked, "the rpm payload"), out, max_bytes)


def _cpio_kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISFIFO(mode):
        return "fifo"
    return "special file"


def _from_cpio(stream: Reader, out: BinaryIO, max_bytes: int) -> None:
    found = False
    count = 0
    while True:
        count += 1
        _check_count(count, "the rpm payload")
        header = _read_exact(stream, CPIO_HEADER_BYTES, "cpio header")
        if header[:6] not in CPIO_MAGICS:
            raise BadArtifact("rpm payload: not a cpio newc archive")
        try:
            fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise BadArtifact("rpm payload: malformed cpio header") from None
        mode, nlink, size, namesize = fields[1], fields[4], fields[6], fields[11]
        if not 0 < namesize <= MAX_CPIO_NAME:
            raise BadArtifact(f"rpm payload: cpio name of {namesize} bytes")
        name = _read_exact(stream, namesize, "cpio name")[:-1].decode("utf-8", "replace")
        # Header plus name, then the data, are each padded to a multiple of 4.
        _skip(stream, -(CPIO_HEADER_BYTES + namesize) % 4, "cpio padding")
        if name == CPIO_TRAILER:
            break
        if is_member_path(name):
            if found:
                raise BadArtifact(f"{name!r} appears twice")
            if not stat.S_ISREG(mode):
                raise BadArtifact(f"{name!r} is a {_cpio_kind(mode)}, not a file")
            if nlink > 1:
                raise BadArtifact(f"{name!r} is a hard link")
            _check_size(size, max_bytes)
            _copy(stream, out, size)
            found = True
        else:
            _skip(stream, size, f"cpio member {name!r}")
        _skip(stream, -size % 4, "cpio padding")
    if not found:
        raise BadArtifact("no elkeid-agent member in the rpm")
