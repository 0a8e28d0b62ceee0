"""The download time budget (elkeid_agent/progress.py, pure) and its use by download_verified
against real sockets on 127.0.0.1: a dripping URL is abandoned for the next one."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from elkeid_agent.download import DownloadError, download_verified
from elkeid_agent.progress import Progress, Rule, Watch


def test_a_rule_needs_positive_values() -> None:
    with pytest.raises(ValueError, match="positive values"):
        Rule(min_bytes=0)
    with pytest.raises(ValueError, match="positive values"):
        Rule(window=0.0)
    with pytest.raises(ValueError, match="positive values"):
        Rule(deadline=-1.0)
    assert Rule().describe() == "64 KiB in 60 s"


def test_each_window_must_bring_the_minimum() -> None:
    watch = Watch("http://h/a", Rule(min_bytes=100, window=10), started=1000.0)
    assert watch.due == 1010.0
    assert not watch.feed(60, 1004.0)  # not yet a window's worth: the due time stays
    assert watch.due == 1010.0
    assert watch.feed(40, 1009.0)  # the minimum is in: a new window starts now
    assert watch.due == 1019.0
    assert watch.total == 100
    assert watch.window_bytes == 0
    # Bytes beyond the minimum do not carry over: each window starts from nothing.
    assert watch.feed(250, 1010.0)
    assert watch.due == 1020.0


def test_behind_means_under_the_pace_a_quarter_window_in() -> None:
    rule = Rule(min_bytes=1000, window=60)
    watch = Watch("http://h/a", rule, started=0.0)
    assert not watch.behind(14.9)  # a connect, a slow first read: too early to say
    assert watch.behind(15.0)  # nothing after 15 s
    watch.feed(400, 20.0)
    assert not watch.behind(20.0)  # 400 by 20 s: ahead of the pace of 1000 per 60 s
    assert watch.behind(30.0)  # 400 by 30 s: behind it
    assert watch.describe(30.0) == "http://h/a (400 bytes in 30 s)"
    assert watch.shortfall(60.0) == (
        "under the minimum progress of 1000 bytes in 60 s: 400 bytes in 60 s"
    )


def test_progress_names_only_a_url_that_is_behind() -> None:
    seen: list[str] = []
    progress = Progress(Rule(min_bytes=1024, window=8), on_abandon=seen.append)
    assert progress.waiting(5.0) is None  # nothing fetched
    progress.watch = Watch("http://h/slow", progress.rule, started=0.0)
    assert progress.waiting(1.0) is None
    assert progress.waiting(3.0) == "http://h/slow (0 bytes in 3 s)"
    progress.abandon("http://h/slow: too slow")
    assert progress.abandoned == seen == ["http://h/slow: too slow"]


async def _serve(handler: object) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)  # type: ignore[arg-type]
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


EXE = b"#!/bin/sh\nexit 0\n"


async def _drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    try:
        for _ in range(1000):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.2)  # 5 bytes a second
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _good(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(EXE) + EXE)
    await writer.drain()
    writer.close()


def test_a_dripping_url_is_abandoned_and_the_next_one_used(tmp_path: Path) -> None:
    async def main() -> Path:
        slow, slow_url = await _serve(_drip)
        good, good_url = await _serve(_good)
        progress = Progress(Rule(min_bytes=64, window=1.0))
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with slow, good:
            path = await download_verified(
                [slow_url + "/a", good_url + "/b"], hashlib.sha256(EXE).hexdigest(), tmp_path,
                progress=progress,
            )
        took = loop.time() - started
        assert path.read_bytes() == EXE
        assert 1.0 <= took < 3.0
        assert len(progress.abandoned) == 1
        assert progress.abandoned[0].startswith(slow_url + "/a: under the minimum progress")
        assert progress.watch is None
        return path

    path = asyncio.run(main())
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_the_entry_deadline_ends_every_url(tmp_path: Path) -> None:
    async def main() -> None:
        slow, url = await _serve(_drip)
        # Each URL keeps its minimum (5 bytes a second against 1 byte a second), but the
        # entry's deadline passes during the first: the second is never requested.
        progress = Progress(Rule(min_bytes=1, window=1.0, deadline=1.5))
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with slow:
            with pytest.raises(DownloadError) as caught:
                await download_verified([url + "/a", url + "/b"], "ab" * 32, tmp_path,
                                        progress=progress)
        assert loop.time() - started < 3.0
        reason = str(caught.value)
        assert "within 1.5 s" in reason
        assert url + "/b: not tried, the entry's deadline of 1.5 s has passed" in reason
        assert progress.abandoned == []

    asyncio.run(main())
    assert list(tmp_path.iterdir()) == []
