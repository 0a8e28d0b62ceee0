"""Whole-file reads of files that come from outside are capped before they happen (issue 18)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from elkeid_agent.config import ConfigError, load_config
from elkeid_agent.plugins import lastset
from elkeid_agent.readcap import CONFIG_FILE_BYTES, FileTooLarge, iter_lines, read_capped
from elkeid_agent.status import read_status
from elkeid_agent.upgrade import swap
from elkeid_agent.upgrade.record import CorruptFile

GiB = 1024**3


def _sparse(path: Path, size: int) -> Path:
    with path.open("wb") as fh:
        fh.truncate(size)
    return path


def test_the_cap_and_what_is_under_it(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1000)
    assert read_capped(path, 1000) == b"x" * 1000
    with pytest.raises(FileTooLarge, match="over the 999 byte cap"):
        read_capped(path, 999)
    # /proc files say 0 bytes: the chunked read is what bounds them.
    assert read_capped("/proc/self/stat", 4096).startswith(str(os.getpid()).encode())
    with pytest.raises(FileTooLarge, match="more than the 10 byte cap"):
        read_capped("/proc/self/status", 10)


def test_a_fifo_or_a_device_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    began = time.monotonic()
    with pytest.raises(OSError, match="not a regular file"):
        read_capped(fifo, 100)
    with pytest.raises(OSError, match="not a regular file"):
        read_capped("/dev/zero", 100)
    assert time.monotonic() - began < 1


def test_huge_state_files_are_refused_by_name(tmp_path: Path) -> None:
    # Sparse: 1 GiB each on the books, nothing on the disk.
    _sparse(tmp_path / "status.json", GiB)
    assert read_status(tmp_path) is None
    _sparse(tmp_path / lastset.LAST_SET_FILE, GiB)
    assert lastset.load(tmp_path) == []
    _sparse(tmp_path / swap.RECORD_FILE, GiB)
    with pytest.raises(CorruptFile, match=r"over the \d+ byte cap"):
        swap.read_record(tmp_path)
    config = _sparse(tmp_path / "agent.toml", 2 * CONFIG_FILE_BYTES)
    with pytest.raises(ConfigError, match=r"cannot read: \d+ bytes, over the 1048576 byte cap"):
        load_config(config, env={}, product=tmp_path / "none.toml")


def test_a_config_nested_too_deeply_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(config, env={}, product=tmp_path / "none.toml")


def test_lines_are_scanned_in_bounded_pieces(tmp_path: Path) -> None:
    path = tmp_path / "route"
    path.write_bytes(b"head\n" + b"r" * 100 + b"\nlast\xff")
    assert list(iter_lines(path, 1000, max_line=40)) == [
        "head", "r" * 40, "r" * 40, "r" * 20, "last\ufffd"
    ]
    lines = iter_lines(path, 50, max_line=40)
    assert next(lines) == "head"
    with pytest.raises(FileTooLarge, match="more than the 50 byte cap"):
        list(lines)
