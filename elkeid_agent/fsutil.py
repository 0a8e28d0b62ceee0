"""Replacing a file so that a crash, a SIGKILL or a full disk leaves the old or the new one whole.

Write a complete copy beside the destination (same directory, so the same filesystem), fsync
it, `rename()` it over the destination, fsync the directory. A failure at any step removes the
copy and raises OSError; the destination is untouched. Callers decide whether that failure is
theirs alone (a status file) or the end of their unit of work (an upgrade swap).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.new")


def open_staging(dest: Path, mode: int) -> int:
    """A fresh file beside `dest` for its next content, opened for writing."""
    staged = staging_path(dest)
    # A leftover of a killed attempt; O_EXCL below then guarantees a fresh inode of ours.
    with contextlib.suppress(FileNotFoundError):
        staged.unlink()
    return os.open(
        staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode
    )


def publish(dest: Path, *, durable: bool = True) -> None:
    """Rename the staged copy over `dest` (and make the rename durable)."""
    os.rename(staging_path(dest), dest)
    if durable:
        fsync_dir(dest.parent)


def atomic_write(dest: Path, data: bytes, mode: int = 0o600, *, durable: bool = True) -> None:
    """Replace `dest` with `data` in one atomic step; OSError leaves `dest` as it was.

    `durable=False` skips both fsyncs, for files that only matter while the host stays up
    (readers still never see a partial file).
    """
    fd = open_staging(dest, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fchmod(out.fileno(), mode)  # the umask may have narrowed os.open's mode
            if durable:
                os.fsync(out.fileno())
        publish(dest, durable=durable)
    except BaseException:
        with contextlib.suppress(OSError):
            staging_path(dest).unlink()
        raise


def describe_error(path: Path, exc: OSError) -> str:
    """`PATH: ENOSPC (No space left on device)`: what a Health fault says of a failed write."""
    name = errno.errorcode.get(exc.errno or 0, "error")
    return f"{path}: {name} ({exc.strerror or exc})"
