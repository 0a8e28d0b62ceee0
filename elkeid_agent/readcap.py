"""Reading a whole file whose size comes from outside the agent: capped before it is read.

`Path.read_bytes()` reads whatever is there: a 2 GiB `status.json`, a certificate path pointed
at a huge file, or a character device that never ends would take the agent's memory budget
(100 MiB for everything) at once. `read_capped` refuses anything but a regular file (opened
without blocking, so a FIFO left at the path cannot hold the caller) and reads at most
`limit` bytes, in chunks: one byte more is `FileTooLarge`, an OSError (EFBIG) naming the path
and the cap, so every caller's existing OSError handling reports it by name. `/proc` and
`/sys` files are regular files whose size reads as 0 or 4096: the chunked read, not their
size, is what bounds them.

Each caller's cap is a named constant beside it (the list is in docs/architecture.md).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator

CHUNK = 1024 * 1024
#: Caps shared by several readers.
SMALL_FILE_BYTES = 64 * 1024  # /proc and /sys one-liners, ids, specified_env
CONFIG_FILE_BYTES = 1024 * 1024  # TOML configs, certificates, the agent's JSON state files
#: A line `iter_lines` yields at most (a longer one comes in pieces).
LINE_BYTES = 64 * 1024


class FileTooLarge(OSError):
    """The file holds more than the reader's cap."""


def read_capped(path: str | os.PathLike[str], limit: int) -> bytes:
    """The whole of a regular file of at most `limit` bytes, read in chunks.

    OSError as `open` raises it; `FileTooLarge` past the cap; EINVAL for anything but a
    regular file.
    """
    fd = _open_regular(path)
    try:
        info = os.fstat(fd)
        if info.st_size > limit:
            raise FileTooLarge(
                errno.EFBIG, f"{info.st_size} bytes, over the {limit} byte cap", os.fspath(path)
            )
        parts: list[bytes] = []
        total = 0
        while block := os.read(fd, min(CHUNK, limit + 1 - total)):
            total += len(block)
            if total > limit:
                raise FileTooLarge(
                    errno.EFBIG, f"more than the {limit} byte cap", os.fspath(path)
                )
            parts.append(block)
        return b"".join(parts)
    finally:
        os.close(fd)


def _open_regular(path: str | os.PathLike[str]) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
    return fd


def iter_lines(
    path: str | os.PathLike[str], max_bytes: int, max_line: int = LINE_BYTES
) -> Iterator[str]:
    """The lines of a text file (split on LF, without it), for files scanned for one line
    (`/proc/net/route` holds a line per route: a router's full table is ~100 MB).

    Memory holds one line (a longer one comes in pieces of `max_line`); `FileTooLarge` once
    `max_bytes` were read. Invalid UTF-8 is replaced.
    """
    with open(_open_regular(path), "rb") as fh:
        total = 0
        while line := fh.readline(max_line):
            total += len(line)
            if total > max_bytes:
                raise FileTooLarge(
                    errno.EFBIG, f"more than the {max_bytes} byte cap", os.fspath(path)
                )
            yield line.removesuffix(b"\n").decode("utf-8", "replace")


def read_text_capped(
    path: str | os.PathLike[str], limit: int, errors: str = "strict"
) -> str:
    """`read_capped` decoded as UTF-8 (UnicodeDecodeError, a ValueError, under `strict`)."""
    return read_capped(path, limit).decode("utf-8", errors)
