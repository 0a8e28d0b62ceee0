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
import shutil
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


def remove_tree(path: Path, *, ignore_errors: bool = False) -> None:
    """`shutil.rmtree`, also for a tree nested deeper than Python's recursion limit.

    rmtree recurses once per level: anything that writes under the tree (a plugin in its own
    directory, an archive's member names) can nest deeper and make it raise RecursionError,
    every time. Then the rest is removed level by level without recursion (symlinks are
    unlinked, never followed). OSError as rmtree raises it, none with `ignore_errors`.
    """
    try:
        shutil.rmtree(path, ignore_errors=ignore_errors)
    except RecursionError:
        try:
            _remove_deep(path)
        except OSError:
            if not ignore_errors:
                raise


def _remove_deep(path: Path) -> None:
    # (directory, its entries are gone): a directory's marker is pushed before its children,
    # so it is popped, and removed, after them.
    stack = [(os.fspath(path), False)]
    while stack:
        directory, emptied = stack.pop()
        if emptied:
            os.rmdir(directory)
            continue
        stack.append((directory, True))
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, False))
                else:
                    os.unlink(entry.path)
