"""The shared atomic write and the health registry."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from elkeid_agent.fsutil import atomic_write, describe_error, remove_tree, staging_path
from elkeid_agent.health import Health


def test_atomic_write_replaces_with_mode(tmp_path: Path) -> None:
    dest = tmp_path / "f"
    dest.write_bytes(b"old")
    atomic_write(dest, b"new", 0o640)
    assert dest.read_bytes() == b"new"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o640
    assert not staging_path(dest).exists()


def test_failed_write_leaves_destination_and_no_staging(tmp_path: Path) -> None:
    dest = tmp_path / "f"
    dest.write_bytes(b"old")
    os.mkdir(staging_path(dest))  # unlink of the stale staging fails: the write cannot start
    with pytest.raises(IsADirectoryError):
        atomic_write(dest, b"new")
    assert dest.read_bytes() == b"old"


def test_health_faults_clear_and_count() -> None:
    h = Health()
    h.fault("status file", "ENOSPC", counter="file_write_failures")
    h.fault("status file", "ENOSPC", counter="file_write_failures")
    assert h.details() == ["status file: ENOSPC"]
    assert h.counters["file_write_failures"] == 2
    h.clear("status file")
    assert h.details() == []
    assert h.counters["file_write_failures"] == 2


def test_describe_error_names_path_and_errno(tmp_path: Path) -> None:
    try:
        (tmp_path / "absent" / "f").write_bytes(b"")
    except OSError as exc:
        text = describe_error(tmp_path / "absent" / "f", exc)
    assert text == f"{tmp_path / 'absent' / 'f'}: ENOENT (No such file or directory)"


def test_remove_tree_removes_a_tree_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    # shutil.rmtree recurses per level and raised RecursionError on such a tree, every time:
    # a plugin that nested its data that deep could never be removed or upgraded.
    root = tmp_path / "tree"
    root.mkdir()
    (tmp_path / "outside").write_text("kept")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(sys.getrecursionlimit() + 100):
        os.mkdir("d", dir_fd=fd)
        os.symlink(tmp_path / "outside", "link", dir_fd=fd)
        inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.close(fd)
    remove_tree(root)
    assert not root.exists()
    assert (tmp_path / "outside").read_text() == "kept"


def test_remove_tree_raises_oserror_as_rmtree(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        remove_tree(tmp_path / "missing")
