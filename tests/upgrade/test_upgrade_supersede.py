"""Issue 18 for the self-upgrade: a changed `elkeid-agent` entry ends the download of the
artifact under way at once (a newer set supersedes the older), and the download keeps the
minimum progress; against a real dripping HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from test_manager import Harness, setup_work, spec, until
from upgradetools import answering, http_files

from elkeid_agent.progress import Rule

A = answering("A")
C = answering("C")


class Drip:
    """An HTTP server whose one answer is 1000 bytes announced, one byte a second."""

    def __init__(self) -> None:
        self.hung_up = asyncio.Event()
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.requests += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        try:
            for _ in range(1000):
                try:
                    async with asyncio.timeout(1.0):
                        if not await reader.read(1):
                            self.hung_up.set()
                            return
                except TimeoutError:
                    pass
                writer.write(b"x")
                await writer.drain()
        except OSError:
            self.hung_up.set()
        finally:
            writer.close()


def test_a_changed_entry_ends_a_dripping_download_at_once(tmp_path: Path) -> None:
    work = setup_work(tmp_path)
    h = Harness(work)
    h.manager.download_rule = Rule(min_bytes=16, window=4.0)

    async def scenario(base: str) -> float:
        drip = Drip()
        server = await asyncio.start_server(drip.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, asyncio.TaskGroup() as tg:
            runner = tg.create_task(h.manager.run())
            await h.manager.consider(spec("B", b"b" * 1000, f"http://127.0.0.1:{port}/b"))
            await until(h.manager.waiting)
            assert f"127.0.0.1:{port}/b" in h.manager.waiting()[0]
            # The same entry again (the server pushes on every reconnect): it goes on.
            await h.manager.consider(spec("B", b"b" * 1000, f"http://127.0.0.1:{port}/b"))
            await asyncio.sleep(0.3)
            assert not drip.hung_up.is_set()
            started = time.monotonic()
            await h.manager.consider(spec("C", C, base + "/c"))
            await asyncio.wait_for(drip.hung_up.wait(), 2)
            took = time.monotonic() - started
            await until(h.exit_requested.is_set)
            runner.cancel()
        assert drip.requests == 1
        return took

    with http_files({"/c": C}) as base:
        took = asyncio.run(scenario(base))
    assert took < 2
    assert (work / "elkeid-agent").read_bytes() == C
    # B was not a failure: no error reported, no 5100 for it.
    assert not any(b"failed" in r for r in h.records)
    assert h.manager.health.counters["downloads_abandoned"] == 0
    assert not list((work / "tmp").glob("upgrade-*"))


def test_a_set_without_the_agent_entry_ends_the_download(tmp_path: Path) -> None:
    work = setup_work(tmp_path)
    h = Harness(work)
    h.manager.download_rule = Rule(min_bytes=16, window=4.0)

    async def scenario() -> None:
        drip = Drip()
        server = await asyncio.start_server(drip.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, asyncio.TaskGroup() as tg:
            runner = tg.create_task(h.manager.run())
            await h.manager.consider(spec("B", b"b" * 1000, f"http://127.0.0.1:{port}/b"))
            await until(lambda: drip.requests)
            await h.manager.withdraw()
            await asyncio.wait_for(drip.hung_up.wait(), 2)
            await until(lambda: h.manager.state == "idle")
            runner.cancel()

    asyncio.run(scenario())
    assert (work / "elkeid-agent").read_bytes() == A
    assert h.records == []
    assert h.errors == {}
    assert not list((work / "tmp").glob("upgrade-*"))
