"""Logging: gzipped rotation in the work dir, and error-level entries as rate-limited 1010s."""

from __future__ import annotations

import gzip
import inspect
import io
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from diskfaults import fill, read_only, tmpfs

from elkeid_agent._proto import grpc_pb2
from elkeid_agent.config import LogConfig
from elkeid_agent.logs import (
    AGENT_LOG,
    HARD_CAP_FACTOR,
    LOG_MODE,
    LOG_NAME,
    LogFileHandler,
    RecordHandler,
    RedactingFormatter,
    setup_logging,
)


@pytest.fixture
def logger(request: pytest.FixtureRequest) -> Iterator[logging.Logger]:
    """A private logger (no propagation to pytest's root handlers)."""
    log = logging.getLogger(f"test-logs.{request.node.name}")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def lines_of(path: Path) -> list[str]:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return raw.decode().splitlines()


def test_rotation_gzips_and_caps_the_count(tmp_path: Path, logger: logging.Logger) -> None:
    path = tmp_path / LOG_NAME
    handler = LogFileHandler(path, max_bytes=2000, backups=3)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    messages = [f"line {i:05d} " + "x" * 80 for i in range(200)]  # ~18 KiB: many rotations
    for message in messages:
        logger.info(message)
        time.sleep(0.001)  # give the compressor thread its turn, as a real agent does
    assert "log-rotate" in {t.name for t in threading.enumerate()}  # compression off-thread
    handler.close()
    assert "log-rotate" not in {t.name for t in threading.enumerate()}  # and stopped by close

    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [LOG_NAME, f"{LOG_NAME}.1.gz", f"{LOG_NAME}.2.gz", f"{LOG_NAME}.3.gz"]
    for i in (1, 2, 3):
        data = (tmp_path / f"{LOG_NAME}.{i}.gz").read_bytes()
        assert data[:2] == b"\x1f\x8b"  # really gzip
        # Rotated at the limit; a rotation waits while the previous one compresses.
        assert 2000 <= len(gzip.decompress(data)) <= 2000 * 4
    # Oldest in the highest number; together they are the newest lines, contiguous, in order.
    kept = []
    for name in (f"{LOG_NAME}.3.gz", f"{LOG_NAME}.2.gz", f"{LOG_NAME}.1.gz", LOG_NAME):
        kept += lines_of(tmp_path / name)
    assert kept == messages[-len(kept) :]
    assert len(kept) >= 3 * 2000 // 91
    assert not list(tmp_path.glob("*.rotating"))  # no uncompressed rotated file left behind
    assert handler.rotation_failures == 0


def test_a_killed_agents_unfinished_rotation_is_compressed(tmp_path: Path) -> None:
    path = tmp_path / LOG_NAME
    path.with_name(LOG_NAME + ".rotating").write_text("from the last run\n")
    handler = LogFileHandler(path, max_bytes=2000, backups=2)
    handler.close()
    assert lines_of(tmp_path / f"{LOG_NAME}.1.gz") == ["from the last run"]
    assert not path.with_name(LOG_NAME + ".rotating").exists()


def test_full_disk_never_raises_counts_and_recovers(
    tmp_path: Path, logger: logging.Logger
) -> None:
    fallback = (tmp_path / "stderr").open("w")
    with tmpfs(tmp_path / "fs", "1m") as fs:
        path = fs / "log" / LOG_NAME
        handler = LogFileHandler(path, max_bytes=10_000_000, backups=2, fallback=fallback)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.raiseExceptions = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.info("before")
        filler = fill(fs)
        for i in range(100):
            logger.info("while full %d %s", i, "y" * 200)  # past any partly used page
        assert handler.failed_writes > 0
        assert handler.error is not None
        assert handler.error.startswith(f"{path}: ENOSPC")
        fallback.flush()
        assert "while full 99" in (tmp_path / "stderr").read_text()  # stderr still gets it
        handler.retry()
        assert handler.error is not None  # still full
        filler.unlink()
        handler.retry()  # what the heartbeat does: no line needs to be logged
        assert handler.error is None
        logger.info("after")
        text = path.read_text()
        lines = text.splitlines()
        assert lines[0] == "before"
        assert lines[-1] == "after"
        assert "lines were not written to it" in text
        assert all(line.startswith(("before", "while full", "after")) or "not written" in line
                   for line in lines)  # a line cut by ENOSPC does not run into the next
        handler.close()
    fallback.close()


def test_rotation_that_cannot_rename_is_counted_and_tried_again(
    tmp_path: Path, logger: logging.Logger
) -> None:
    path = tmp_path / "log" / LOG_NAME
    handler = LogFileHandler(path, max_bytes=200, backups=2)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.info("opened before the disk turned read-only")
    with read_only(tmp_path / "log"):
        for i in range(20):  # the open file still takes lines; the rename cannot happen
            logger.info("line %d %s", i, "r" * 40)
        assert handler.rotation_failures == 1  # once, not once per line
        assert handler.error is None
        handler.retry()  # a heartbeat later: one more try
        logger.info("after retry")
        assert handler.rotation_failures == 2
    handler.retry()
    logger.info("writable again")
    handler.close()
    assert (tmp_path / "log" / f"{LOG_NAME}.1.gz").exists()
    assert handler.rotation_failures == 2


def test_the_file_stops_at_its_hard_cap_while_no_rotation_can_be_made(
    tmp_path: Path, logger: logging.Logger
) -> None:
    path = tmp_path / "log" / LOG_NAME
    handler = LogFileHandler(path, max_bytes=200, backups=2, fallback=io.StringIO())
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.info("opened before the disk turned read-only")
    with read_only(tmp_path / "log"):
        for i in range(100):
            logger.info("line %d %s", i, "r" * 40)
        assert path.stat().st_size <= HARD_CAP_FACTOR * 200
        assert handler.over_cap > 80
        assert handler.rotation_failures == 1
    handler.retry()
    for i in range(5):  # writable again: the file rotates and takes lines
        logger.info("writable again %d", i)
    handler.close()
    assert lines_of(path)[-1] == "writable again 4"
    assert (tmp_path / "log" / f"{LOG_NAME}.1.gz").exists()


def test_missing_log_dir_is_recreated(tmp_path: Path, logger: logging.Logger) -> None:
    path = tmp_path / "log" / LOG_NAME
    handler = LogFileHandler(path, max_bytes=2000, backups=2)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.info("one")
    # An operator removes the directory while the agent runs: lines would go to the deleted
    # file until the heartbeat's retry() notices and the next line reopens it.
    path.unlink()
    path.parent.rmdir()
    handler.retry()
    logger.info("two")
    assert path.read_text() == "two\n"
    assert handler.error is None


def test_fallback_to_a_pipe_nobody_reads_never_blocks(
    tmp_path: Path, logger: logging.Logger
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    read_end, write_end = os.pipe()
    fallback = os.fdopen(write_end, "w")
    try:
        handler = LogFileHandler(blocker / LOG_NAME, max_bytes=2000, backups=1,
                                 fallback=fallback)
        logger.addHandler(handler)
        started = time.monotonic()
        for i in range(5000):  # ~0.5 MB: far beyond a pipe's 64 KiB
            logger.info("line %d %s", i, "z" * 80)
        assert time.monotonic() - started < 10
        assert handler.failed_writes == 5000
        assert handler.error == f"{blocker}: EEXIST (File exists)"
        assert handler.stderr_dropped > 0
    finally:
        fallback.close()
        os.close(read_end)


def test_a_fifo_at_the_log_path_never_blocks(tmp_path: Path, logger: logging.Logger) -> None:
    # Whatever sits at the path, a log line must not wait for it: a FIFO without a reader made
    # open() block, and logging runs on the event loop's thread.
    path = tmp_path / LOG_NAME
    os.mkfifo(path)
    handler = LogFileHandler(path, max_bytes=2000, backups=1)
    logger.addHandler(handler)
    writer = threading.Thread(target=logger.error, args=("a line",), daemon=True)
    writer.start()
    writer.join(5)
    blocked = writer.is_alive()
    if blocked:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # let it go
        writer.join(5)
    assert not blocked, "a log line waited for a reader of the FIFO"
    assert handler.failed_writes == 1
    assert handler.error is not None


def test_setup_logging_writes_into_work_dir(tmp_path: Path) -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    try:
        handler = setup_logging(
            tmp_path, LogConfig(level="info", file_bytes=10_000, file_count=2)
        )
        logging.getLogger("elkeid.test").warning("written to the file")
        logging.getLogger("elkeid.test").debug("below the level")
        text = (tmp_path / "log" / LOG_NAME).read_text()
        assert "written to the file" in text
        assert "below the level" not in text
        file_handlers = [h for h in root.handlers if isinstance(h, LogFileHandler)]
        assert file_handlers == [handler]
        assert handler.max_bytes == 10_000
        assert handler.backups == 2
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        for h in saved_handlers:
            root.addHandler(h)
        root.setLevel(saved_level)


def test_the_log_and_its_rotations_are_not_world_readable(
    tmp_path: Path, logger: logging.Logger
) -> None:
    path = tmp_path / LOG_NAME
    path.write_text("left by an older version\n")
    path.chmod(0o644)
    handler = LogFileHandler(path, max_bytes=500, backups=2)
    logger.addHandler(handler)
    for i in range(30):
        logger.info("line %d %s", i, "x" * 40)
        time.sleep(0.001)
    handler.close()
    files = sorted(tmp_path.iterdir())
    assert len(files) == 3, files
    assert {f.name: f.stat().st_mode & 0o777 for f in files} == dict.fromkeys(
        (f.name for f in files), LOG_MODE
    )


def test_server_text_cannot_forge_a_log_line(tmp_path: Path, logger: logging.Logger) -> None:
    path = tmp_path / LOG_NAME
    handler = LogFileHandler(path, max_bytes=100_000, backups=1)
    handler.setFormatter(RedactingFormatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.info("plugin version %s", "1.0\nERROR forged\r\x1b[2J")
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        logger.exception("failed: %s", "a\nb")
    logger.warning("dump\n%s", "  frame 1\n  frame 2", extra={"verbatim": True})
    handler.close()
    lines = path.read_text().splitlines()
    assert lines[0] == "INFO plugin version 1.0\\nERROR forged\\r\\x1b[2J"
    assert lines[1] == "ERROR failed: a\\nb"
    # The traceback keeps its lines; a verbatim record too.
    assert lines[2] == "  Traceback (most recent call last):"
    assert lines[-3:] == ["WARNING dump", "  frame 1", "  frame 2"]


def test_setup_logging_in_a_read_only_work_dir(tmp_path: Path) -> None:
    """The agent starts anyway: the file reports its fault, the lines go to stderr."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    work = tmp_path / "work"
    work.mkdir()
    try:
        with read_only(work):
            handler = setup_logging(work, LogConfig())
            logging.getLogger("elkeid.test").warning("nowhere to write")
            assert handler.error is not None
            assert handler.error == f"{work / 'log'}: EROFS (Read-only file system)"
            assert handler.failed_writes == 1
        handler.retry()  # writable again
        assert handler.error is None
        assert "1 lines were not written" in (work / "log" / LOG_NAME).read_text()
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        for h in saved_handlers:
            root.addHandler(h)
        root.setLevel(saved_level)


def decode(records: list[bytes]) -> list[grpc_pb2.Record]:
    return [grpc_pb2.Record.FromString(r) for r in records]


def test_record_handler_emits_1010_for_errors_only(logger: logging.Logger) -> None:
    emitted: list[bytes] = []
    handler = RecordHandler(emitted.append, per_minute=60)
    logger.addHandler(handler)
    logger.debug("debug")
    logger.info("info")
    logger.warning("warning")
    before = time.time()
    logger.error("disk %s is full", "/dev/sda1")
    line = inspect.stack()[0].lineno - 1  # the logger.error call just above
    logger.critical("going down")
    assert len(emitted) == 2
    first, second = decode(emitted)
    assert first.data_type == AGENT_LOG == 1010
    assert int(before) <= first.timestamp <= int(time.time())
    fields = dict(first.data.fields)
    assert fields["level"] == "error"
    assert fields["msg"] == "disk /dev/sda1 is full"
    assert fields["source"] == f"test_logs.py:{line}"
    assert dict(second.data.fields)["level"] == "critical"
    assert handler.suppressed == 0


def test_record_handler_carries_the_exception(logger: logging.Logger) -> None:
    emitted: list[bytes] = []
    logger.addHandler(RecordHandler(emitted.append, per_minute=60))
    try:
        raise ValueError("bad value")
    except ValueError:
        logger.exception("it failed")
    (record,) = decode(emitted)
    assert dict(record.data.fields)["msg"] == "it failed"
    assert "bad value" in dict(record.data.fields)["error"]


def test_record_handler_token_bucket(logger: logging.Logger) -> None:
    emitted: list[bytes] = []
    handler = RecordHandler(emitted.append, per_minute=120)  # burst 120, then 2 per second
    logger.addHandler(handler)
    for i in range(1000):  # a log storm
        logger.error("storm %d", i)
    assert len(emitted) == 120
    assert handler.suppressed == 880
    assert [dict(r.data.fields)["msg"] for r in decode(emitted)] == [
        f"storm {i}" for i in range(120)
    ]
    time.sleep(0.6)  # 1.2 tokens come back
    logger.error("after the storm")
    logger.error("still limited")
    assert len(emitted) == 121
    assert dict(decode(emitted[-1:])[0].data.fields)["msg"] == "after the storm"
    assert handler.suppressed == 881


def test_record_handler_minimum_rate(logger: logging.Logger) -> None:
    emitted: list[bytes] = []
    handler = RecordHandler(emitted.append, per_minute=0)  # clamped to at least one
    logger.addHandler(handler)
    logger.error("one")
    logger.error("two")
    assert len(emitted) == 1
    assert handler.suppressed == 1


def test_record_handler_never_raises_into_the_caller(logger: logging.Logger) -> None:
    emitted: list[bytes] = []
    handler = RecordHandler(emitted.append, per_minute=60)
    handler.handleError = lambda record: None  # type: ignore[method-assign]  # quiet stderr
    # Straight to the handler: pytest's own capture handler re-raises format errors on purpose.
    bad = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "two %s %s", ("one",), None)
    handler.handle(bad)
    handler.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 2, "still working",
                                     (), None))
    assert [dict(r.data.fields)["msg"] for r in decode(emitted)] == ["still working"]


def test_a_log_file_the_agent_cannot_chmod_is_still_written(tmp_path: Path) -> None:
    """Left to another owner (an agent that no longer runs as root, a filesystem that refuses
    chmod): the mode is tightened where it can be, never at the cost of the log; and a stricter
    mode an operator set is not loosened."""
    os.chmod(tmp_path, 0o777)
    foreign = tmp_path / "foreign.log"
    foreign.write_text("")
    foreign.chmod(0o666)
    strict = tmp_path / "strict.log"
    strict.write_text("")
    strict.chmod(0o600)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.chdir(tmp_path)  # its parents are root's alone
            os.setuid(65534)
            handler = LogFileHandler(Path(foreign.name), max_bytes=100_000, backups=1)
            handler.emit(logging.makeLogRecord({"msg": "still logged"}))
            handler.close()
            code = 0
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0
    assert "still logged" in foreign.read_text()
    handler = LogFileHandler(strict, max_bytes=100_000, backups=1)
    handler.emit(logging.makeLogRecord({"msg": "kept private"}))
    handler.close()
    assert strict.stat().st_mode & 0o777 == 0o600


def test_an_exceptions_text_cannot_forge_a_log_line(tmp_path: Path, logger: logging.Logger) -> None:
    """A traceback's lines are indented: whatever an exception's text holds (a server's
    field name, a plugin's error), no line of it starts at the margin where records start."""
    path = tmp_path / LOG_NAME
    handler = LogFileHandler(path, max_bytes=100_000, backups=1)
    handler.setFormatter(RedactingFormatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    try:
        try:
            raise KeyError("x")
        except KeyError as exc:
            raise ValueError("bad\nERROR forged\r\x1b[2J") from exc
    except ValueError:
        logger.exception("failed")
    logger.info("next")
    handler.close()
    lines = path.read_text().splitlines()
    assert [line for line in lines if not line.startswith(" ")] == ["ERROR failed", "INFO next"]
    assert "  ValueError: bad" in lines
    assert "  ERROR forged\\r\\x1b[2J" in lines
