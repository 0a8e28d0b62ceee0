"""Spool storage choice (issue 11): SQLite WAL against append-only CRC'd segment files.

Both stores take the same entries (spliced record chunks of `--records-per-entry` 300-byte
records), make them durable once a second, then give them back oldest first and forget them.
Printed per store: records/s in and out, CPU µs per record (in + out), bytes the process
caused to be written per record (/proc/self/io write_bytes, so WAL copies and checkpoints
count). Run from the repository: `.venv/bin/python bench/spool_storage.py`.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

RECORD = b"\x0a\xaa\x02" + b"r" * 297  # one spliced 300-byte record entry


def io_written() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def run_sqlite(directory: Path, entries: list[bytes]) -> tuple[float, float]:
    db = sqlite3.connect(directory / "spool.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE e (id INTEGER PRIMARY KEY, lane INT, n INT, data BLOB)")
    last_sync = time.monotonic()
    t0 = time.monotonic()
    db.execute("BEGIN")
    for data in entries:
        db.execute("INSERT INTO e (lane, n, data) VALUES (2, 500, ?)", (data,))
        if time.monotonic() - last_sync >= 1.0:
            db.execute("COMMIT")
            db.execute("BEGIN")
            last_sync = time.monotonic()
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(FULL)")
    t_in = time.monotonic() - t0
    t0 = time.monotonic()
    while True:
        rows = db.execute("SELECT id, data FROM e ORDER BY id LIMIT 16").fetchall()
        if not rows:
            break
        db.execute("DELETE FROM e WHERE id <= ?", (rows[-1][0],))
    db.close()
    return t_in, time.monotonic() - t0


def run_segments(directory: Path, entries: list[bytes]) -> tuple[float, float]:
    header = struct.Struct("<BBIIIII")
    segment_bytes = 16 * 1024 * 1024
    fd = -1
    seg = 0
    size = segment_bytes
    last_sync = time.monotonic()
    t0 = time.monotonic()
    for data in entries:
        if size >= segment_bytes:
            if fd >= 0:
                os.fsync(fd)
                os.close(fd)
            seg += 1
            fd = os.open(directory / f"{seg:016d}.seg", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            size = 0
        head = header.pack(0xE5, 2, 500, int(time.time()), len(data), zlib.crc32(data), 0)
        size += os.write(fd, head + data)
        if time.monotonic() - last_sync >= 1.0:
            os.fsync(fd)
            last_sync = time.monotonic()
    os.fsync(fd)
    os.close(fd)
    t_in = time.monotonic() - t0
    t0 = time.monotonic()
    for path in sorted(directory.glob("*.seg")):
        blob = path.read_bytes()
        pos = 0
        while pos < len(blob):
            _m, _l, _n, _t, length, crc, _h = header.unpack_from(blob, pos)
            pos += header.size
            if zlib.crc32(blob[pos:pos + length]) != crc:
                raise SystemExit("crc")
            pos += length
        path.unlink()
        (directory / "checkpoint").write_bytes(struct.pack("<QQ", 0, pos))
    return t_in, time.monotonic() - t0


def measure(name: str, fn: Callable[[Path, list[bytes]], tuple[float, float]],
            entries: list[bytes], records: int) -> None:
    with tempfile.TemporaryDirectory(dir=os.environ.get("SPOOL_BENCH_DIR", "/tmp")) as tmp:
        cpu0, io0 = time.process_time(), io_written()
        t_in, t_out = fn(Path(tmp), entries)
        cpu, written = time.process_time() - cpu0, io_written() - io0
    print(f"{name:9} in {records / t_in:>10,.0f} rec/s   out {records / t_out:>10,.0f} rec/s   "
          f"CPU {cpu / records * 1e6:5.2f} µs/rec   written {written / records:6.1f} B/rec")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--records-per-entry", type=int, nargs="+", default=[500, 20])
    args = parser.parse_args()
    for per in args.records_per_entry:
        entries = [RECORD * per] * (args.records // per)
        records = len(entries) * per
        print(f"-- {records:,} records of 300 B, {per} per entry ({len(entries[0]):,} B)")
        measure("sqlite", run_sqlite, entries, records)
        measure("segments", run_segments, entries, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
