"""Logging: gzipped rotation in the work dir, and error-level entries as rate-limited 1010s."""

from __future__ import annotations

import gzip
import inspect
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from elkeid_agent._proto import grpc_pb2
from elkeid_agent.config import LogConfig
from elkeid_agent.logs import (
    AGENT_LOG,
    LOG_NAME,
    GzipRotatingFileHandler,
    RecordHandler,
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
    handler = GzipRotatingFileHandler(path, max_bytes=2000, backups=3)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    messages = [f"line {i:05d} " + "x" * 80 for i in range(200)]  # ~18 KiB: many rotations
    for message in messages:
        logger.info(message)
    handler.close()

    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [LOG_NAME, f"{LOG_NAME}.1.gz", f"{LOG_NAME}.2.gz", f"{LOG_NAME}.3.gz"]
    for i in (1, 2, 3):
        data = (tmp_path / f"{LOG_NAME}.{i}.gz").read_bytes()
        assert data[:2] == b"\x1f\x8b"  # really gzip
        assert len(gzip.decompress(data)) <= 2000
    # Oldest in the highest number; together they are the newest lines, contiguous, in order.
    kept = []
    for name in (f"{LOG_NAME}.3.gz", f"{LOG_NAME}.2.gz", f"{LOG_NAME}.1.gz", LOG_NAME):
        kept += lines_of(tmp_path / name)
    assert kept == messages[-len(kept) :]
    assert len(kept) >= 3 * 2000 // 91
    assert not list(tmp_path.glob("*.log.[0-9]"))  # no uncompressed rotated file left behind


def test_setup_logging_writes_into_work_dir(tmp_path: Path) -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    try:
        setup_logging(tmp_path, LogConfig(level="info", file_bytes=10_000, file_count=2))
        logging.getLogger("elkeid.test").warning("written to the file")
        logging.getLogger("elkeid.test").debug("below the level")
        for handler in root.handlers:
            handler.flush()
        text = (tmp_path / "log" / LOG_NAME).read_text()
        assert "written to the file" in text
        assert "below the level" not in text
        file_handlers = [h for h in root.handlers if isinstance(h, GzipRotatingFileHandler)]
        assert len(file_handlers) == 1
        assert file_handlers[0].maxBytes == 10_000
        assert file_handlers[0].backupCount == 2
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved_handlers:
            root.addHandler(handler)
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
