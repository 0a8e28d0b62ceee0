"""Real filesystem faults for tests: a small tmpfs to fill, read-only bind mounts (root only)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

FILL_NAME = "fill"


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")


@contextlib.contextmanager
def tmpfs(directory: Path, size: str = "4m") -> Iterator[Path]:
    """A fresh tmpfs of `size` on `directory` (created), unmounted (lazily if busy) after."""
    require_root()
    directory.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(directory))
    try:
        yield directory
    finally:
        _run("umount", "-l", str(directory))


def fill(directory: Path) -> Path:
    """Write zeros into `directory` until the filesystem says ENOSPC; the file that did it."""
    path = directory / FILL_NAME
    chunk = b"\0" * 65536
    with path.open("ab", buffering=0) as out:
        while True:
            try:
                out.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        # The last pages may take smaller writes: fill those too.
        while True:
            try:
                out.write(b"\0" * 512)
            except OSError:
                break
    return path


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[Path]:
    """`directory` bind-mounted read-only over itself; writable again on exit.

    Files opened for writing before keep their write access (they belong to the mount
    beneath); everything opened or created afterwards gets EROFS.
    """
    require_root()
    _run("mount", "--bind", str(directory), str(directory))
    try:
        _run("mount", "-o", "remount,bind,ro", str(directory))
        yield directory
    finally:
        _run("umount", "-l", str(directory))
