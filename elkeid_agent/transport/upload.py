"""Task 1050: stream a file to the server with FileExt.Upload (PROTOCOL.md section 3).

Limits as the Go agent keeps them: at most one chunk of min(buf_size, 500 KiB) per second, files
over buf_size * 600 refused, one upload at a time, the whole call bounded by 600 s. The task is
accepted or refused at once (one at a time, connected, a valid buf_size); the transfer runs in
`run()`, owned by the app's task group, and reports its outcome, from the open on, as a 5100.

The file is opened, read and closed by a `FileThread` of the upload's own, each operation bounded
by `FILE_TIMEOUT`: a path on a hung filesystem (NFS) fails its upload, and neither the event loop
(the receive loop, heartbeats, the stream) nor asyncio's shared thread pool (the spool's disk
work) nor the process's exit waits for it. While such a thread is still stuck, new uploads are
refused (a Health fault says why), so at most one thread is ever stuck.

One upload is a unit of failure: whatever ends it (a read error, a file that shrinks, the
deadline, the server, a defect) ends it with a 5100 and a log line, and the one-at-a-time slot
is released in every case. grpc.aio swallows an exception raised by the request iterator and
only cancels the call (as it does when the channel closes), raising CancelledError in the
awaiting task: unless that task itself is being cancelled, this is the upload's failure (the
iterator's, kept aside, or the closed connection), not a reason to end `run()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import stat
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from elkeid_agent._proto import grpc_pb2
from elkeid_agent.commands import UploadRequest, task_result
from elkeid_agent.errors import TaskFailed
from elkeid_agent.health import Health
from elkeid_agent.transport.grpc_env import grpc

log = logging.getLogger(__name__)
T = TypeVar("T")
V = TypeVar("V")

UPLOAD_METHOD = "/grpc.FileExt/Upload"
MAX_CHUNK = 500 * 1024
MAX_CHUNKS = 600
CHUNK_INTERVAL = 1.0
#: The whole Upload call, as the Go agent bounds it (10 minutes).
UPLOAD_DEADLINE = 600.0
#: Each file operation of an upload (stat and open; one chunk's read).
FILE_TIMEOUT = 30.0
#: The Health unit of a file operation that has not returned.
FILE_UNIT = "upload file"


@dataclass(frozen=True)
class _Job:
    token: str
    path: str
    buf_size: int
    chunk: int


class FileThread:
    """One upload's file operations, in order, on a daemon thread of its own.

    The thread owns the file: it opens it (`fd`), reads it, and closes it after `close`, once
    whatever it was doing has returned. Daemon: one stuck in the kernel never holds up the
    process's exit.
    """

    def __init__(self, on_exit: Callable[[FileThread], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_exit = on_exit
        self._requests: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.fd = -1
        threading.Thread(target=self._serve, name="upload-file", daemon=True).start()

    def _serve(self) -> None:
        while (request := self._requests.get()) is not None:
            request()
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self._to_loop(lambda: self._on_exit(self))

    def _to_loop(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            self._loop.call_soon_threadsafe(callback)

    async def call(self, fn: Callable[[], T], limit: float) -> T:
        """`fn()` on the thread; TimeoutError after `limit` s (it may still be running)."""
        future: asyncio.Future[T] = self._loop.create_future()

        def run() -> None:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - raised again in the caller, on the loop
                self._to_loop(partial(_settle, future, future.set_exception, exc))
            else:
                self._to_loop(partial(_settle, future, future.set_result, result))

        self._requests.put(run)
        async with asyncio.timeout(limit):
            return await future

    # The operations, called on the thread (through `call`).

    def open(self, path: str, buf_size: int) -> int:
        """Open the file for this thread to own; its size."""
        self.fd, size = _open_regular(path, buf_size)
        return size

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def close(self) -> None:
        """Close the file and end the thread, after the operation under way (if any)."""
        self._requests.put(None)


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
        self._files: FileThread | None = None  # the current upload's
        self._stuck: FileThread | None = None  # an earlier upload's, still in an operation
        self._ready = asyncio.Event()
        self.completed = 0
        self.failed = 0

    async def upload(self, token: str, request: UploadRequest) -> None:
        """Accept an upload task or raise TaskFailed with the reason."""
        if self._job is not None:
            raise TaskFailed("another upload is in progress")
        if self._stuck is not None:
            raise TaskFailed("a file operation of an earlier upload has not returned "
                             "(a hung filesystem?)")
        if request.buf_size <= 0:
            raise TaskFailed(f"invalid buf_size {request.buf_size}")
        if self._channel() is None:
            raise TaskFailed("not connected to the server")
        self._job = _Job(token, request.path, request.buf_size, min(request.buf_size, MAX_CHUNK))
        self._ready.set()

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            job = self._job
            if job is None:
                continue
            files = self._files = FileThread(self._file_thread_ended)
            try:
                size = await self._file_op(job, files, partial(files.open, job.path, job.buf_size))
                await self._transfer(job, files, size)
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
                self._emit(task_result(job.token, True, f"uploaded {size} bytes"))
            finally:
                self._job = self._files = None
                files.close()

    async def _file_op(self, job: _Job, files: FileThread, fn: Callable[[], T]) -> T:
        try:
            return await files.call(fn, self._file_timeout)
        except TimeoutError:
            self._stuck = files
            self.health.fault(
                FILE_UNIT,
                f"{job.path}: a file operation has not returned after {self._file_timeout:g} s "
                "(a hung filesystem?); uploads are refused until it does",
                "upload_file_timeouts",
            )
            raise TaskFailed(
                f"{job.path}: no answer from the filesystem within {self._file_timeout:g} s "
                "(a hung filesystem?)"
            ) from None

    def _file_thread_ended(self, files: FileThread) -> None:
        if self._stuck is files:
            self._stuck = None
            self.health.clear(FILE_UNIT)

    def _failed(self, job: _Job, reason: str) -> None:
        self.failed += 1
        log.warning("upload of %s failed: %s", job.path, reason)
        self._emit(task_result(job.token, False, f"upload failed: {reason}"))

    async def _chunks(
        self, job: _Job, files: FileThread, size: int, failure: list[Exception]
    ) -> AsyncIterator[grpc_pb2.FileUploadRequest]:
        remaining = size
        first = True
        try:
            while remaining > 0 or first:
                if not first:
                    await asyncio.sleep(self._interval)
                read = partial(files.pread, min(job.chunk, remaining), size - remaining)
                data = await self._file_op(job, files, read)
                if not data and remaining:
                    raise TaskFailed(f"{job.path} shrank during the upload")
                remaining -= len(data)
                first = False
                yield grpc_pb2.FileUploadRequest(token=job.token, data=data)
        except Exception as exc:
            failure.append(exc)  # grpc.aio only cancels the call; `_transfer` reports this
            raise

    async def _transfer(self, job: _Job, files: FileThread, size: int) -> None:
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
            response = await call(self._chunks(job, files, size, failure), timeout=self._deadline)
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


def _settle(future: asyncio.Future[T], setter: Callable[[V], None], value: V) -> None:
    if not future.done():  # not given up on (timed out, cancelled)
        setter(value)
