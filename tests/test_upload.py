"""1050 uploads as units of failure: every end is a 5100 and frees the one-at-a-time slot.

The Uploader runs against the real local center over real mutual TLS (grpc.aio, as in the
agent); files are real, and so are their failures: a file truncated mid-way, a read that fails
(the descriptor replaced by a directory's, so pread gets EISDIR), a deadline that passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from elkeid_agent._proto import grpc_pb2
from elkeid_agent.commands import UploadRequest
from elkeid_agent.errors import TaskFailed
from elkeid_agent.transport.grpc_env import grpc
from elkeid_agent.transport.upload import Uploader
from elkeid_center.certs import SERVER_NAME
from elkeid_center.testing import CenterThread

CHUNK = 1000


class Rig:
    def __init__(
        self, dial: Callable[[], grpc.aio.Channel], results: list[dict[str, str]], **kw: float
    ) -> None:
        self.dial = dial
        self.channel: grpc.aio.Channel | None = dial()
        self.uploader = Uploader(lambda: self.channel, self.emit, **kw)
        self.results = results
        self.emitted = asyncio.Event()

    def emit(self, raw: bytes) -> None:
        record = grpc_pb2.Record.FromString(raw)
        assert record.data_type == 5100
        self.results.append(dict(record.data.fields))
        self.emitted.set()

    async def result(self, n: int, limit: float = 15.0) -> dict[str, str]:
        async with asyncio.timeout(limit):
            while len(self.results) < n:
                self.emitted.clear()
                await self.emitted.wait()
        return self.results[n - 1]


@contextlib.asynccontextmanager
async def rig(center: CenterThread, **kw: float) -> AsyncIterator[Rig]:
    certs = center.certs
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certs.ca.read_bytes(),
        private_key=certs.client_key.read_bytes(),
        certificate_chain=certs.client_cert.read_bytes(),
    )

    def dial() -> grpc.aio.Channel:
        return grpc.aio.secure_channel(
            center.address, credentials, options=[("grpc.ssl_target_name_override", SERVER_NAME)]
        )

    r = Rig(dial, [], **kw)
    runner = asyncio.create_task(r.uploader.run())
    try:
        yield r
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        if r.channel is not None:
            await r.channel.close()


def go(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


def fd_target(fd: int) -> str | None:
    """What one of our fds names now (None: closed)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        return None


async def opened(r: Rig) -> int:
    """The fd of the file the current upload's thread opened."""
    async with asyncio.timeout(5):
        while (files := r.uploader._files) is None or files.fd < 0:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return files.fd


async def closed(fd: int, path: Path, limit: float = 5.0) -> None:
    """Until `fd` no longer names `path` (the file thread closes it when it is free)."""
    async with asyncio.timeout(limit):
        while fd_target(fd) == str(path):  # noqa: ASYNC110 - another thread closes it
            await asyncio.sleep(0.02)


def test_a_file_that_shrinks_ends_with_a_5100_and_frees_the_slot(
    center: CenterThread, tmp_path: Path
) -> None:
    source = tmp_path / "shrinks"
    source.write_bytes(b"x" * (CHUNK * 4))

    async def body() -> None:
        async with rig(center, chunk_interval=0.3) as r:
            await r.uploader.upload("s-1", UploadRequest(str(source), CHUNK))
            await asyncio.sleep(0.1)  # the first chunk is on its way
            os.truncate(source, CHUNK)
            result = await r.result(1)
            assert result["status"] == "failed"
            assert result["token"] == "s-1"
            assert "shrank" in result["msg"]
            assert r.uploader.failed == 1
            # The slot is free: the next upload is accepted and completes.
            await r.uploader.upload("s-2", UploadRequest(str(source), CHUNK))
            assert (await r.result(2))["status"] == "succeed"

    go(body)


def test_a_read_error_ends_with_a_5100_and_frees_the_slot(
    center: CenterThread, tmp_path: Path
) -> None:
    source = tmp_path / "unreadable"
    source.write_bytes(b"y" * (CHUNK * 4))

    async def body() -> None:
        async with rig(center, chunk_interval=0.3) as r:
            await r.uploader.upload("r-1", UploadRequest(str(source), CHUNK))
            fd = await opened(r)
            directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
            os.dup2(directory, fd)  # the next pread fails with EISDIR
            os.close(directory)
            result = await r.result(1)
            assert result["status"] == "failed"
            assert "Is a directory" in result["msg"]
            await r.uploader.upload("r-2", UploadRequest(str(source), CHUNK))
            assert (await r.result(2))["status"] == "succeed"

    go(body)
    assert center.uploads["r-2"].data == b"y" * (CHUNK * 4)


def test_the_call_has_a_deadline(center: CenterThread, tmp_path: Path) -> None:
    source = tmp_path / "slow"
    source.write_bytes(b"z" * (CHUNK * 10))

    async def body() -> None:
        async with rig(center, chunk_interval=0.5, deadline=1.5) as r:
            await r.uploader.upload("d-1", UploadRequest(str(source), CHUNK))
            result = await r.result(1)
            assert result["status"] == "failed"
            assert "DEADLINE_EXCEEDED" in result["msg"]
            await asyncio.sleep(0.1)
            assert r.uploader._job is None

    go(body)


def test_a_cancelled_upload_frees_the_slot_and_the_fd(
    center: CenterThread, tmp_path: Path
) -> None:
    source = tmp_path / "cancelled"
    source.write_bytes(b"c" * (CHUNK * 10))

    async def body() -> None:
        async with rig(center, chunk_interval=0.5) as r:
            await r.uploader.upload("c-1", UploadRequest(str(source), CHUNK))
            fd = await opened(r)
            await asyncio.sleep(0.2)
        # `rig` cancelled the runner mid-transfer.
        assert r.uploader._job is None
        # The file thread closes the fd (its number may then serve something else).
        await closed(fd, source)

    go(body)


def test_a_nul_in_the_path_is_refused_not_raised(center: CenterThread) -> None:
    async def body() -> None:
        async with rig(center) as r:
            # Built without the edge's validation, as a caller inside the agent could.
            request = UploadRequest("/etc/passwd", CHUNK)
            request.path = "/etc/pass\x00wd"
            await r.uploader.upload("n", request)
            result = await r.result(1)
            assert result["status"] == "failed"
            assert "cannot open" in result["msg"]
            assert r.uploader._job is None

    go(body)


def test_a_closed_connection_ends_the_upload_not_the_uploader(
    center: CenterThread, tmp_path: Path
) -> None:
    source = tmp_path / "cut"
    source.write_bytes(b"k" * (CHUNK * 10))

    async def body() -> None:
        async with rig(center, chunk_interval=0.3) as r:
            await r.uploader.upload("k-1", UploadRequest(str(source), CHUNK))
            await asyncio.sleep(0.5)
            assert r.channel is not None
            await r.channel.close()  # what the transfer loop does on a reconnect
            result = await r.result(1)
            assert result["status"] == "failed"
            assert "cancelled" in result["msg"]
            r.channel = r.dial()
            small = tmp_path / "small"
            small.write_bytes(b"s" * CHUNK)
            await r.uploader.upload("k-2", UploadRequest(str(small), CHUNK))
            assert (await r.result(2))["status"] == "succeed"

    go(body)


def test_a_path_that_is_not_a_regular_file_is_never_opened(
    center: CenterThread, tmp_path: Path
) -> None:
    # Opening is itself an action on a device or a FIFO (/dev/watchdog arms the watchdog, a
    # FIFO releases a writer waiting for a reader): the server's path is checked first.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    released = asyncio.Event()

    async def body() -> None:
        loop = asyncio.get_running_loop()

        def writer() -> None:
            fd = os.open(fifo, os.O_WRONLY)  # blocks until someone opens the FIFO to read
            os.close(fd)
            loop.call_soon_threadsafe(released.set)

        waiting = loop.run_in_executor(None, writer)
        await asyncio.sleep(0.2)
        async with rig(center) as r:
            await r.uploader.upload("f", UploadRequest(str(fifo), CHUNK))
            result = await r.result(1)
            assert result["status"] == "failed"
            assert "not a regular file" in result["msg"]
        await asyncio.sleep(0.2)
        opened_by_agent = released.is_set()
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # let the writer go
        await waiting
        assert not opened_by_agent, "the upload opened the FIFO"

    go(body)


def test_a_hung_filesystem_fails_the_upload_not_the_loop(
    center: CenterThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's operations run on a thread of the upload's own, each under a bound: a path
    on a hung filesystem (NFS) gets a 5100, while the loop (heartbeats, the stream, the
    receive loop) goes on; new uploads are refused, said, until the stuck call returns."""
    from elkeid_agent.transport import upload

    source = tmp_path / "on-nfs"
    source.write_bytes(b"h" * (CHUNK * 3))
    release = threading.Event()  # the hung server answers
    late: list[int] = []
    really_open = upload._open_regular

    def hung_open(path: str, buf_size: int) -> tuple[int, int]:
        release.wait(10)
        fd, size = really_open(path, buf_size)
        late.append(fd)
        return fd, size

    async def body() -> None:
        async with rig(center, file_timeout=0.3) as r:
            stalls: list[float] = []

            async def ticker() -> None:  # how late the loop runs a 10 ms timer
                while True:
                    before = time.monotonic()
                    await asyncio.sleep(0.01)
                    stalls.append(time.monotonic() - before - 0.01)

            tick = asyncio.create_task(ticker())
            monkeypatch.setattr(upload, "_open_regular", hung_open)
            await r.uploader.upload("h-1", UploadRequest(str(source), CHUNK))  # accepted at once
            result = await r.result(1)
            assert result["status"] == "failed"
            assert "no answer from the filesystem within 0.3 s" in result["msg"]
            assert r.uploader.health.counters["upload_file_timeouts"] == 1
            assert r.uploader.health.faulty(upload.FILE_UNIT)
            with pytest.raises(TaskFailed, match="has not returned"):
                await r.uploader.upload("h-2", UploadRequest(str(source), CHUNK))
            release.set()  # the open completes: its fd is closed, uploads are taken again
            async with asyncio.timeout(5):
                while r.uploader.health.faulty(upload.FILE_UNIT):  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            assert late
            await closed(late[0], source)
            monkeypatch.undo()

            # A read that hangs: the same.
            release.clear()
            really_pread = os.pread

            def hung_pread(fd: int, n: int, offset: int) -> bytes:
                release.wait(10)
                return really_pread(fd, n, offset)

            monkeypatch.setattr(os, "pread", hung_pread)
            await r.uploader.upload("h-3", UploadRequest(str(source), CHUNK))
            result = await r.result(2)
            assert result["status"] == "failed"
            assert "no answer from the filesystem" in result["msg"]
            release.set()
            monkeypatch.undo()
            async with asyncio.timeout(5):
                while r.uploader.health.faulty(upload.FILE_UNIT):  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            await r.uploader.upload("h-4", UploadRequest(str(source), CHUNK))
            assert (await r.result(3))["status"] == "succeed"
            tick.cancel()
            assert max(stalls) < 0.25, f"the loop stalled {max(stalls):.2f} s"

    go(body)
    assert center.uploads["h-4"].data == b"h" * (CHUNK * 3)
