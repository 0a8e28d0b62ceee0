"""Tar archives read by our own header parser: every declared size is checked before a byte of
it is read, and everything is read in bounded chunks.

Why not `tarfile`: it reads the whole body of a GNU long-name or long-link header (typeflag
`L`/`K`) and of a pax header (`x`/`g`) into memory before any cap of ours can look at it. A
1 MiB tar.gz whose long-name header declared 1 GiB took the agent past 2 GiB of RSS, and was
then refused as `'': file without a name`. The format is small and fixed (512-byte blocks; a
header block, then the body padded to a block), so it is parsed here.

Pure over a `Reader` (anything with `read(n)`): the caller opens and decompresses. Refusals
are `TarRefused`, whose message names the member and the limit and whose `counter` names the
heartbeat counter of a breached cap. What is read: the POSIX ustar and old v7 headers, GNU
`L`/`K` names and base-256 sizes, pax `path`/`linkpath`/`size`. Global pax headers (`g`) are
bounded and skipped; sparse files (GNU `S`, pax `GNU.sparse.*`) are their own kind, which
every caller refuses.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Protocol

BLOCK = 512
CHUNK = 1024 * 1024
#: Linux's PATH_MAX: no file with a longer name can be created, so nothing longer is read.
MAX_NAME_BYTES = 4096
#: One pax extended header: a few records (path, linkpath, size, times) fit in far less.
MAX_PAX_BYTES = 64 * 1024
#: Directories a member may be nested in (our packages: 3); deeper is refused by name, not
#: left to a RecursionError wherever a path is walked level by level.
MAX_DEPTH = 64
#: Heartbeat counters of the breaches (besides the callers' member-count and size caps).
HEADER_CAP_COUNTER = "archive_header_cap"
DEPTH_CAP_COUNTER = "archive_depth_cap"

_POSIX_MAGIC = b"ustar\x00"
_KINDS = {
    b"0": "file",
    b"\x00": "file",
    b"7": "file",  # contiguous file: a regular file everywhere but on old Masscomp systems
    b"5": "dir",
    b"1": "hard link",
    b"2": "symbolic link",
    b"3": "device",
    b"4": "device",
    b"6": "fifo",
    b"S": "sparse file",
}
#: Kinds whose size field is not followed by data (tar writes 0; a hostile one may not).
_NO_DATA = frozenset(("dir", "hard link", "symbolic link", "device", "fifo"))
_GNU_LONG_NAME = b"L"
_GNU_LONG_LINK = b"K"
_PAX = b"x"
_PAX_GLOBAL = b"g"


class Reader(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class TarRefused(Exception):
    """The archive cannot be read safely; `counter` names the heartbeat counter of a cap."""

    def __init__(self, reason: str, counter: str | None = None) -> None:
        super().__init__(reason)
        self.counter = counter


@dataclass(frozen=True)
class Header:
    """One header block, decoded (pure: `parse_header`)."""

    name: str
    mode: int
    size: int
    typeflag: bytes
    linkname: str


@dataclass(frozen=True)
class Member:
    """A member as the archive means it: long names and pax records applied."""

    name: str
    kind: str  # "file", "dir", "hard link", "symbolic link", "device", "fifo", ...
    size: int  # bytes of data that follow the header
    mode: int
    linkname: str


def quote_name(name: str) -> str:
    """A member name for a reason line: long (hostile) names are cut."""
    return repr(name if len(name) <= 100 else name[:100] + "...")


def _text(field: bytes) -> str:
    return field.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def _number(field: bytes, what: str) -> int:
    """An octal field (NUL/space padded), or GNU base-256 when the top bit is set."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    if field[:1] == b"\xff":
        raise TarRefused(f"negative {what}")
    text = field.split(b"\x00", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarRefused(f"malformed {what} field {field!r}") from None


def parse_header(block: bytes) -> Header | None:
    """Decode one 512-byte header block; None for an all-zero block (the end of the archive)."""
    if len(block) != BLOCK:
        raise TarRefused("truncated header")
    if block.count(0) == BLOCK:
        return None
    stored = _number(block[148:156], "checksum")
    # The checksum counts its own field as eight spaces; some writers sum signed bytes.
    unsigned = sum(block[:148]) + sum(block[156:]) + 8 * 0x20
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 127)
    if stored not in (unsigned, signed):
        raise TarRefused("bad header checksum (not a tar archive, or a damaged one)")
    name = _text(block[0:100])
    typeflag = block[156:157]
    if block[257:263] == _POSIX_MAGIC:
        prefix = _text(block[345:500])
        if prefix:
            name = f"{prefix}/{name}"
    return Header(
        name=name,
        mode=_number(block[100:108], "mode"),
        size=_number(block[124:136], "size"),
        typeflag=typeflag,
        linkname=_text(block[157:257]),
    )


def parse_pax(data: bytes) -> dict[str, str]:
    """The records of a pax extended header (`"%d %s=%s\\n"`, the length counting all of it)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break  # padding some writers leave
        space = data.find(b" ", pos, pos + 20)
        try:
            length = int(data[pos:space]) if space > pos else 0
        except ValueError:
            length = 0
        end = pos + length
        if length <= 0 or end > len(data) or data[end - 1 : end] != b"\n":
            raise TarRefused("malformed pax record")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise TarRefused("malformed pax record")
        records[key.decode("utf-8", "surrogateescape")] = value.decode(
            "utf-8", "surrogateescape"
        )
        pos = end
    return records


def depth(name: str) -> int:
    """How many path components deep `name` is ("." ignored)."""
    return sum(1 for part in PurePosixPath(name).parts if part not in (".", "/"))


class TarReader:
    """The members of a tar stream, one forward pass (no seeking).

    Iterate for the members; while a member is current, `body()` yields its data in chunks
    of at most CHUNK bytes. What a caller does not read is skipped, in chunks, before the
    next header. Every header counts against `max_members` (long-name and pax headers too:
    an archive of them alone must end early as well).
    """

    def __init__(
        self,
        stream: Reader,
        *,
        max_members: int,
        member_counter: str,
        max_depth: int = MAX_DEPTH,
    ) -> None:
        self._stream = stream
        self._max_members = max_members
        self._member_counter = member_counter
        self._max_depth = max_depth
        self._left = 0  # body bytes of the current member not read yet
        self._padding = 0  # then this many bytes to the next block boundary

    def _read_exact(self, n: int, what: str) -> bytes:
        parts: list[bytes] = []
        left = n
        while left > 0:
            block = self._stream.read(min(left, CHUNK))
            if not block:
                raise TarRefused(f"truncated {what}")
            parts.append(block)
            left -= len(block)
        return b"".join(parts)

    def _skip(self, n: int, what: str) -> None:
        left = n
        while left > 0:
            left -= len(self._read_exact(min(left, CHUNK), what))

    def _extended(self, header: Header, cap: int, what: str) -> bytes:
        """The body of a long-name or pax header, its declared size checked first."""
        if header.size > cap:
            raise TarRefused(
                f"{what} header declares {header.size} bytes, over the {cap} byte cap",
                HEADER_CAP_COUNTER,
            )
        data = self._read_exact(header.size, f"{what} header")
        self._skip(-header.size % BLOCK, f"{what} header")
        return data

    def body(self) -> Iterator[bytes]:
        """The current member's data, in chunks."""
        while self._left > 0:
            block = self._read_exact(min(self._left, CHUNK), "member data")
            self._left -= len(block)
            yield block

    def __iter__(self) -> Iterator[Member]:
        count = 0
        long_name: str | None = None
        long_link: str | None = None
        pax: dict[str, str] = {}
        while True:
            self._skip(self._left + self._padding, "member data")
            self._left = self._padding = 0
            block = self._stream.read(BLOCK)
            if not block:
                return  # no end-of-archive blocks: tolerated, as by tar and tarfile
            if len(block) < BLOCK:
                block += self._read_exact(BLOCK - len(block), "header")
            header = parse_header(block)
            if header is None:
                return
            count += 1
            if count > self._max_members:
                raise TarRefused(
                    f"more than {self._max_members} members", self._member_counter
                )
            if header.typeflag in (_GNU_LONG_NAME, _GNU_LONG_LINK):
                what = "GNU long name" if header.typeflag == _GNU_LONG_NAME else "GNU long link"
                text = _text(self._extended(header, MAX_NAME_BYTES, what))
                if header.typeflag == _GNU_LONG_NAME:
                    long_name = text
                else:
                    long_link = text
                continue
            if header.typeflag in (_PAX, _PAX_GLOBAL):
                records = parse_pax(self._extended(header, MAX_PAX_BYTES, "pax"))
                if header.typeflag == _PAX:
                    pax = records
                continue
            member = self._member(header, long_name, long_link, pax)
            long_name = long_link = None
            pax = {}
            self._left = 0 if member.kind in _NO_DATA else member.size
            self._padding = -self._left % BLOCK
            yield member

    def _member(
        self, header: Header, long_name: str | None, long_link: str | None, pax: dict[str, str]
    ) -> Member:
        name = pax.get("path", long_name if long_name is not None else header.name)
        linkname = pax.get("linkpath", long_link if long_link is not None else header.linkname)
        size = header.size
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise TarRefused(f"{quote_name(name)}: malformed pax size") from None
        if size < 0:
            raise TarRefused(f"{quote_name(name)}: negative size")
        if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise TarRefused(
                f"{quote_name(name)}: name longer than {MAX_NAME_BYTES} bytes", HEADER_CAP_COUNTER
            )
        levels = depth(name)
        if levels > self._max_depth:
            raise TarRefused(
                f"{quote_name(name)}: nested {levels} levels deep, over the {self._max_depth} cap",
                DEPTH_CAP_COUNTER,
            )
        kind = _KINDS.get(header.typeflag, "special file")
        if kind == "file" and header.typeflag == b"\x00" and name.endswith("/"):
            kind = "dir"  # the old v7 way of writing a directory
        if any(key.startswith("GNU.sparse.") for key in pax):
            kind = "sparse file"
        if kind == "dir":
            name = name.rstrip("/")  # as tarfile gives it
        return Member(name=name, kind=kind, size=size, mode=header.mode, linkname=linkname)
