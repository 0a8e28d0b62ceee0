"""A plugin's stderr file keeps its newest part under its cap (issue 18)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from elkeid_agent.plugins import process
from elkeid_agent.plugins.stderr import MIN_CAP, CappedFile, StderrCopier, StderrStats

KiB = 1024


def test_the_file_keeps_its_newest_part_under_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "p.stderr"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    stats = StderrStats()
    capped = CappedFile(fd, MIN_CAP, stats)
    written = bytearray()
    for i in range(8000):
        line = b"line %06d %s\n" % (i, b"x" * (i % 50))
        capped.append(line)
        written += line
        assert os.fstat(fd).st_size <= MIN_CAP
    os.close(fd)
    data = path.read_bytes()
    note, _, kept = data.partition(b"\n")
    dropped = len(written) - len(kept)
    assert note == b"[elkeid-agent: %d older bytes of this file dropped]" % dropped
    assert written.endswith(kept)
    assert len(kept) >= MIN_CAP // 4
    assert stats.truncations > 1
    assert stats.dropped_bytes == dropped


def test_a_cap_under_the_minimum_is_refused(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(ValueError, match="under"):
            CappedFile(fd, MIN_CAP - 1, StderrStats())
    finally:
        os.close(fd)


def test_the_copier_drains_a_flood_and_closes_its_fds_at_eof(tmp_path: Path) -> None:
    r, w = os.pipe()
    path = tmp_path / "p.stderr"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    truncated = threading.Event()
    stats = StderrStats()
    copier = StderrCopier("p", r, fd, MIN_CAP, stats, truncated.set)
    copier.start()
    block = b"z" * 65536
    for _ in range(256):  # 16 MiB
        os.write(w, block)
    os.write(w, b"\nthe last words\n")
    os.close(w)
    copier.thread.join(10)
    assert not copier.thread.is_alive()
    assert truncated.is_set()
    assert path.stat().st_size <= MIN_CAP
    assert path.read_bytes().endswith(b"the last words\n")
    for closed in (r, fd):
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(closed)


def test_stop_ends_the_copier_while_a_stray_writer_floods(tmp_path: Path) -> None:
    # A process that left the plugin's group may hold the pipe and write on for ever.
    r, w = os.pipe()
    fd = os.open(tmp_path / "p.stderr", os.O_RDWR | os.O_CREAT, 0o600)
    copier = StderrCopier("p", r, fd, MIN_CAP, StderrStats())
    copier.start()
    broken = threading.Event()

    def flood() -> None:
        try:
            while True:
                os.write(w, b"s" * 4096)
        except BrokenPipeError:  # the reader is gone: the writer learns it
            broken.set()

    writer = threading.Thread(target=flood, daemon=True)
    writer.start()
    try:
        copier.stop()
        copier.thread.join(5)
        assert not copier.thread.is_alive()
        assert broken.wait(5)
    finally:
        os.close(w)
    assert (tmp_path / "p.stderr").stat().st_size <= MIN_CAP


def test_the_next_run_gets_a_file_the_last_copier_cannot_write(tmp_path: Path) -> None:
    # A restart opens the stderr file again while the last run's copier may still drain a
    # pipe a stray process holds: what it copies late must not land in the new run's file.
    path = tmp_path / "p.stderr"
    r, w = os.pipe()
    old = StderrCopier("p", r, process._open_stderr(path), MIN_CAP, StderrStats())
    old.start()
    try:
        os.write(w, b"x" * 1000)
        deadline = time.monotonic() + 5
        while path.stat().st_size < 1000 and time.monotonic() < deadline:
            time.sleep(0.01)
        old.stop()
        fresh = process._open_stderr(path)  # the next run's, at once
        os.write(w, b"late" * 100)  # the stray writer, before the last drain
        old.thread.join(5)
        assert not old.thread.is_alive()
        assert path.stat().st_size == 0
        os.close(fresh)
    finally:
        os.close(w)
