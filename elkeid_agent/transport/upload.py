"""Task 1050: stream a file to the server with FileExt.Upload (PROTOCOL.md section 3).

Limits as the Go agent keeps them: at most one chunk of min(buf_size, 500 KiB) per second, files
over buf_size * 600 refused, one upload at a time, the whole call bounded by 600 s. The request
is checked when the task arrives (so a bad one fails at once); the transfer runs in `run()`,
owned by the app's task group, and reports its outcome as a 5100 record. The file's stat, open
and reads run in threads, each bounded by `FILE_TIMEOUT`: a path on a hung filesystem (NFS)
fails its upload, and the event loop, the heartbeats and the stream go on.

One upload is a unit of failure: whatever ends it (a read error, a file that shrinks, the
deadline, the server, a defect) ends it with a 5100 and a log line, and the one-at-a-time slot
is released in every case. grpc.aio swallows an exception raised by the request iterator and
only cancels the call (as it does when the channel closes), raising CancelledError in the
awaiting task: unless that task itself is being cancelled, this is the upload's failure (the
iterator's, kept aside, or the closed connection), not a reason to end `run()`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from elkeid_agent._proto import grpc_pb2
from elkeid_agent.commands import UploadRequest, task_result
from elkeid_agent.errors import TaskFailed
from elkeid_agent.health import Health
from elkeid_agent.transport.grpc_env import grpc

log = logging.getLogger(__name__)

UPLOAD_METHOD = "/grpc.FileExt/Upload"
MAX_CHUNK = 500 * 1024
MAX_CHUNKS = 600
CHUNK_INTERVAL = 1.0
#: The whole Upload call, as the Go agent bounds it (10 minutes).
UPLOAD_DEADLINE = 600.0
#: Each file operation of an upload (stat and open; one chunk's read).
FILE_TIMEOUT = 30.0


@dataclass(frozen=True)
class _Job:
    token: str
    path: str
    fd: int
    size: int
    chunk: int


class Uploader:
    def __init__(
        self,
        channel: Callable[[], grpc.aio.Channel | None],
        emit: Callable[[bytes], None],
        chunk_interval: float = CHUNK_INTERVAL,
        health: Health | None = None,
        deadline: float = UPLOAD_DEADLINE,
        file_timeout: float = FILE_TIMEOUT,
    ) -> None:
        self._channel = channel
        self._emit = emit
        self._interval = chunk_interval
        self._deadline = deadline
        self._file_timeout = file_timeout
        self.health = Health() if health is None else health
        self._job: _Job | None = None
        self._opening = False  # the slot is taken while the file is opened, too
        self._ready = asyncio.Event()
        self.completed = 0
        self.failed = 0

    async def upload(self, token: str, request: UploadRequest) -> None:
        """Accept an upload task or raise TaskFailed with the reason."""
        if self._job is not None or self._opening:
            raise TaskFailed("another upload is in progress")
        if request.buf_size <= 0:
            raise TaskFailed(f"invalid buf_size {request.buf_size}")
        if self._channel() is None:
            raise TaskFailed("not connected to the server")
        chunk = min(request.buf_size, MAX_CHUNK)
        self._opening = True
        try:
            fd, size = await self._open(request.path, request.buf_size)
        finally:
            self._opening = False
        self._job = _Job(token, request.path, fd, size, chunk)
        self._ready.set()

    async def _open(self, path: str, buf_size: int) -> tuple[int, int]:
        future = asyncio.get_running_loop().run_in_executor(None, _open_regular, path, buf_size)
        try:
            async with asyncio.timeout(self._file_timeout):
                return await asyncio.shield(future)
        except TimeoutError:
            future.add_done_callback(_close_late)
            raise TaskFailed(
                f"cannot open {path}: no answer within {self._file_timeout:g} s "
                "(a hung filesystem?)"
            ) from None
        except asyncio.CancelledError:
            future.add_done_callback(_close_late)
            raise

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            job = self._job
            if job is None:
                continue
            try:
                await self._transfer(job)
            except grpc.aio.AioRpcError as exc:
                self._failed(job, f"{exc.code().name}: {exc.details()}")
            except (TaskFailed, OSError) as exc:
                self._failed(job, str(exc))
            except Exception as exc:  # the boundary of one upload
                log.error("upload of %s: unexpected failure", job.path, exc_info=exc)
                self.health.fault("upload", repr(exc), "upload_errors")
                self._failed(job, repr(exc))
            else:
                self.completed += 1
                self.health.clear("upload")
                self._emit(task_result(job.token, True, f"uploaded {job.size} bytes"))
            finally:
                self._job = None
                os.close(job.fd)

    def _failed(self, job: _Job, reason: str) -> None:
        self.failed += 1
        log.warning("upload of %s failed: %s", job.path, reason)
        self._emit(task_result(job.token, False, f"upload failed: {reason}"))

    async def _chunks(
        self, job: _Job, failure: list[Exception]
    ) -> AsyncIterator[grpc_pb2.FileUploadRequest]:
        remaining = job.size
        first = True
        try:
            while remaining > 0 or first:
                if not first:
                    await asyncio.sleep(self._interval)
                data = await self._read(job, min(job.chunk, remaining), job.size - remaining)
                if not data and remaining:
                    raise TaskFailed(f"{job.path} shrank during the upload")
                remaining -= len(data)
                first = False
                yield grpc_pb2.FileUploadRequest(token=job.token, data=data)
        except Exception as exc:
            failure.append(exc)  # grpc.aio only cancels the call; `_transfer` reports this
            raise

    async def _read(self, job: _Job, size: int, offset: int) -> bytes:
        try:
            async with asyncio.timeout(self._file_timeout):
                return await asyncio.to_thread(os.pread, job.fd, size, offset)
        except TimeoutError:
            raise TaskFailed(
                f"{job.path}: a read got no answer within {self._file_timeout:g} s "
                "(a hung filesystem?)"
            ) from None

    async def _transfer(self, job: _Job) -> None:
        channel = self._channel()
        if channel is None:
            raise TaskFailed("not connected to the server")
        call = channel.stream_unary(
            UPLOAD_METHOD,
            request_serializer=grpc_pb2.FileUploadRequest.SerializeToString,
            response_deserializer=grpc_pb2.FileUploadResponse.FromString,
        )
        failure: list[Exception] = []
        try:
            response = await call(self._chunks(job, failure), timeout=self._deadline)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being cancelled ourselves
            # Not us: grpc.aio cancels the call when the reader fails or the channel closes.
            if failure:
                raise failure[0] from None
            raise TaskFailed("the upload call was cancelled (connection closed)") from None
        except grpc.aio.AioRpcError:
            if failure:
                raise failure[0] from None
            raise
        if failure:  # the server answered before the reader's failure cancelled the call
            raise failure[0]
        if response.status != grpc_pb2.FileUploadResponse.SUCCESS:
            raise TaskFailed("the server reported a failed upload")


def _open_regular(path: str, buf_size: int) -> tuple[int, int]:
    """Open `path` for reading if it is a regular file within the size limit: (fd, size).
    Blocking: run in a thread."""
    try:
        # Checked before the open: opening a device or a FIFO is itself an action
        # (/dev/watchdog arms the watchdog, a FIFO releases a writer).
        before = os.stat(path)
        if not stat.S_ISREG(before.st_mode):
            raise TaskFailed(f"{path} is not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise TaskFailed(f"cannot open {path}: {exc.strerror}") from exc
    except ValueError as exc:  # a NUL in the path, for a request not checked at the edge
        raise TaskFailed(f"cannot open {path!r}: {exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (
            before.st_dev, before.st_ino
        ):
            raise TaskFailed(f"{path} is not a regular file")
        if st.st_size > buf_size * MAX_CHUNKS:
            raise TaskFailed(
                f"{path} is {st.st_size} bytes, over the limit of {buf_size * MAX_CHUNKS}"
            )
    except TaskFailed:
        os.close(fd)
        raise
    return fd, st.st_size


def _close_late(future: asyncio.Future[tuple[int, int]]) -> None:
    """An open given up on (timed out, cancelled) that succeeded after all: close its fd."""
    if not future.cancelled() and future.exception() is None:
        os.close(future.result()[0])
