"""The local center for synchronous tests: `CenterThread` runs it on its own event loop in
a background thread and offers blocking, thread-safe methods; `write_agent_config`
writes the agent's TOML pointing at it; `client_channel` opens an mTLS channel to it.

    with CenterThread() as center:
        center.set_configs([{"name": "p", "version": "1", ...}])
        path = center.write_agent_config(tmp / "agent.toml", tmp / "work")
        ... start the agent with `run --config path` ...
        hb = center.wait_records(1000)
"""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc

from elkeid_agent._proto import grpc_pb2
from elkeid_center.agent_config import Compression, write_agent_config
from elkeid_center.center import LocalCenter
from elkeid_center.certs import SERVER_NAME, CertFiles, ensure_certs, https_context
from elkeid_center.httpd import BackendLike
from elkeid_center.server import (
    ConfigLike,
    ServerTls,
    Target,
    configs_command,
    task_command,
)
from elkeid_center.store import ConnectionInfo, DecodedRecord, ReceivedPackage, Upload

__all__ = [
    "CenterThread",
    "ConnectionInfo",
    "DecodedRecord",
    "ReceivedPackage",
    "TransferClient",
    "Upload",
    "client_channel",
    "write_agent_config",
]

T = TypeVar("T")
# How long a cross-thread call into the center may take before the test fails.
CALL_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.02
TRANSFER_METHOD = "/grpc.Transfer/Transfer"
UPLOAD_METHOD = "/grpc.FileExt/Upload"


def client_channel(
    address: str,
    certs: CertFiles,
    *,
    client_cert: bool = True,
    compression: grpc.Compression | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A synchronous mTLS channel to a center, as the agent would open it (`options`
    are extra grpc channel arguments)."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certs.ca.read_bytes(),
        private_key=certs.client_key.read_bytes() if client_cert else None,
        certificate_chain=certs.client_cert.read_bytes() if client_cert else None,
    )
    return grpc.secure_channel(
        address,
        credentials,
        options=[("grpc.ssl_target_name_override", SERVER_NAME), *options],
        compression=compression,
    )


class TransferClient:
    """A raw Transfer stream for tests of the center itself: send PackagedData bytes
    exactly as given, receive Commands with a timeout. Stands in for an agent."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._requests: queue.Queue[bytes | None] = queue.Queue()
        self._responses: queue.Queue[grpc_pb2.Command | grpc.RpcError] = queue.Queue()
        call = channel.stream_stream(
            TRANSFER_METHOD,
            request_serializer=None,
            response_deserializer=grpc_pb2.Command.FromString,
        )
        self._call = call(iter(self._requests.get, None))
        self._reader = threading.Thread(target=self._read, name="transfer-client", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for command in self._call:
                self._responses.put(command)
        except grpc.RpcError as e:
            # Handed to the test thread: the status is what tests of refusals check.
            self._responses.put(e)

    def send(self, raw: bytes) -> None:
        self._requests.put(raw)

    def recv(self, timeout: float = 10.0) -> grpc_pb2.Command | None:
        """The next Command, or None if none came within `timeout`; raises the
        stream's RpcError if it ended with an error."""
        try:
            item = self._responses.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, grpc.RpcError):
            raise item
        return item

    def wait_end(self, timeout: float = 10.0) -> grpc.StatusCode:
        """Wait for the stream to end; return its status (OK when closed cleanly)."""
        self._reader.join(timeout)
        if self._reader.is_alive():
            raise TimeoutError("stream still open")
        code: grpc.StatusCode = self._call.code()
        return code

    def close(self) -> None:
        """Half-close our side (as an agent does on shutdown)."""
        self._requests.put(None)

    def cancel(self) -> None:
        self._call.cancel()


class CenterThread:
    """A LocalCenter on a background event loop, driven with blocking calls.

    Lifecycle: `start()` starts the thread and every server; `stop()` takes only the
    gRPC server down (breaking every stream) while service discovery and the file
    server keep answering; `start()` or `restart()` brings gRPC back on the same port;
    `close()` stops everything and the thread. Also a context manager.

    Certificates: `certs_dir` is reused if it holds a complete PKI, else one is written
    there; without it a temporary directory is used and removed on close.
    `server_cert`/`server_key` replace what the gRPC server presents (for tests with a
    wrong name or an unrelated CA); clients are still checked against `certs_dir`'s CA.
    `files_tls` serves downloads over HTTPS with a cert for `host` from the same CA.
    """

    def __init__(
        self,
        certs_dir: str | os.PathLike[str] | None = None,
        *,
        files_dir: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        sd_port: int = 0,
        file_port: int = 0,
        server_cert: str | os.PathLike[str] | None = None,
        server_key: str | os.PathLike[str] | None = None,
        configs: Iterable[ConfigLike] | None = None,
        files_tls: bool = False,
    ) -> None:
        self._tmp: str | None = None
        if certs_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="elkeid-center-")
            certs_dir = self._tmp
        self.certs = ensure_certs(certs_dir)
        tls = ServerTls.from_certs(self.certs)
        if (server_cert is None) != (server_key is None):
            raise ValueError("server_cert and server_key go together")
        if server_cert is not None and server_key is not None:
            tls = ServerTls(self.certs.ca, Path(server_cert), Path(server_key))
        self.center = LocalCenter(
            self.certs,
            host=host,
            port=port,
            sd_port=sd_port,
            file_port=file_port,
            files_dir=files_dir,
            server_tls=tls,
            files_ssl=https_context(self.certs, host) if files_tls else None,
        )
        if configs is not None:
            self.center.grpc.set_configs(configs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> CenterThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> CenterThread:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=self._run_loop, args=(loop,), name="elkeid-center", daemon=True
            )
            thread.start()
            self._loop, self._thread = loop, thread
            self._call(self.center.start())
        else:
            self._call(self.center.grpc.start())
        return self

    def stop(self) -> None:
        """Take the gRPC server down; every open stream breaks."""
        if self._loop is not None:
            self._call(self.center.grpc.stop())

    def restart(self) -> None:
        """Stop and start gRPC on the same port (agents must reconnect)."""
        self.stop()
        self.start()

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None:
            self._call(self.center.close())
            loop.call_soon_threadsafe(loop.stop)
            thread.join(CALL_TIMEOUT_S)
            self._loop = self._thread = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the center is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CALL_TIMEOUT_S)

    def _on_loop(self, fn: Callable[[], T]) -> T:
        """Run `fn` where the server state lives: on the loop, or here before start()."""
        if self._loop is None:
            return fn()

        async def run() -> T:
            return fn()

        return self._call(run())

    # --- addresses ---------------------------------------------------------------

    @property
    def host(self) -> str:
        return self.center.host

    @property
    def port(self) -> int:
        return self.center.grpc.port

    @property
    def address(self) -> str:
        """gRPC "host:port" (private/public address for the agent config)."""
        return self.center.grpc.address

    @property
    def running(self) -> bool:
        """True while the gRPC server listens."""
        return self.center.grpc.running

    @property
    def sd_port(self) -> int:
        return self.center.sd_http.port

    @property
    def sd_address(self) -> str:
        """Service discovery "host:port" (for `service_discovery` in the agent config)."""
        return f"{self.host}:{self.sd_port}"

    @property
    def file_port(self) -> int:
        return self.center.file_http.port

    def file_url(self, name: str) -> str:
        """Download URL of `name` under files_dir."""
        return self.center.file_url(name)

    def write_agent_config(
        self,
        path: str | os.PathLike[str],
        work_dir: str | os.PathLike[str],
        *,
        via: Literal["private", "public", "service_discovery"] = "private",
        regions: Mapping[str, Mapping[str, str]] | None = None,
        compression: Compression = "none",
        buffer_bytes: int | None = None,
        signing_key: str | None = None,
    ) -> Path:
        """The agent's config for this center; by default region `default` reaches it
        at `via` (`service_discovery` means through this center's SD endpoint)."""
        if regions is None:
            address = self.sd_address if via == "service_discovery" else self.address
            regions = {"default": {via: address}}
        return write_agent_config(
            path,
            work_dir,
            self.certs.directory,
            regions,
            compression=compression,
            buffer_bytes=buffer_bytes,
            signing_key=signing_key,
        )

    # --- what was received -------------------------------------------------------

    def records(
        self, data_type: int | None = None, connection: int | None = None
    ) -> list[DecodedRecord]:
        """Every record received so far, in order, optionally of one type or stream."""
        return self.center.store.records(data_type, connection)

    def packaged(self, connection: int | None = None) -> list[ReceivedPackage]:
        """Every Transfer message: (raw bytes, decoded PackagedData, receive time)."""
        return self.center.store.packaged(connection)

    def connections(self) -> list[ConnectionInfo]:
        """Every Transfer stream so far (open ones have closed_at None), oldest first."""
        return self.center.store.connections()

    def open_connections(self) -> list[ConnectionInfo]:
        return [c for c in self.connections() if c.closed_at is None]

    @property
    def uploads(self) -> dict[str, Upload]:
        """FileExt uploads by token (data, per-chunk arrival times and sizes)."""
        return self.center.store.uploads()

    @property
    def decode_errors(self) -> int:
        """Transfer messages that were not valid PackagedData (their stream was cut)."""
        return self.center.store.decode_errors

    def sd_requests(self) -> list[str]:
        return self.center.sd.request_log()

    def file_requests(self) -> list[str]:
        """Paths asked of the file server, in order."""
        return self.center.files.request_log()

    def count_only(self, data_types: Iterable[int]) -> None:
        """Decode and count records of `data_types` but keep none of them (`counted`)."""
        self.center.store.count_only = frozenset(data_types)

    def counted(self, data_type: int) -> int:
        """Records of a `count_only` type received so far."""
        return self.center.store.counted(data_type)

    def set_read_rate(self, records_per_second: float | None) -> None:
        """Read at most this many records per second from each stream (None: no limit),
        as a server slower than the agent: the rest waits in grpc's buffers, unread."""
        self._on_loop(lambda: setattr(self.center.grpc, "read_rate", records_per_second))

    def clear(self) -> None:
        """Forget received packages, records and uploads."""
        self.center.store.clear()

    def wait_for(
        self, predicate: Callable[[], T], timeout: float = 10.0, interval: float = POLL_INTERVAL_S
    ) -> T:
        """Poll `predicate()` until it returns something truthy and return that value;
        TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"condition not met within {timeout} s")
            time.sleep(interval)

    def wait_records(
        self, data_type: int | None = None, count: int = 1, timeout: float = 10.0
    ) -> list[DecodedRecord]:
        """Wait until at least `count` records (of `data_type`) arrived; return them all."""
        return self.wait_for(
            lambda: r if len(r := self.records(data_type)) >= count else [], timeout
        )

    def wait_connected(self, timeout: float = 10.0, agent_id: str | None = None) -> ConnectionInfo:
        """Wait for an open stream that has sent its first PackagedData (from `agent_id`
        if given) and return the newest such stream."""

        def ready() -> list[ConnectionInfo]:
            return [
                c
                for c in self.open_connections()
                if c.packages and (agent_id is None or c.agent_id == agent_id)
            ]

        return self.wait_for(ready, timeout)[-1]

    # --- commands ----------------------------------------------------------------

    def send_command(self, command: grpc_pb2.Command, target: Target | int = "all") -> int:
        """Push a Command to all open streams, the latest one, or a stream id; returns
        how many streams it went to."""
        return self._on_loop(lambda: self.center.grpc.push(command, target))

    def send_raw_command(self, raw: bytes, target: Target | int = "all") -> int:
        """Push bytes as one Command message, exactly as given (b"" is the empty Command)."""
        return self._on_loop(lambda: self.center.grpc.push(raw, target))

    def send_task(
        self,
        data_type: int,
        object_name: str,
        data: str | Mapping[str, Any] = "",
        token: str = "",
        target: Target | int = "all",
    ) -> int:
        """Push a Task Command (a mapping `data` is sent as JSON)."""
        return self.send_command(task_command(data_type, object_name, data, token), target)

    def send_configs(self, configs: Iterable[ConfigLike], target: Target | int = "all") -> int:
        """Push a Configs Command now (does not change what new streams get)."""
        return self.send_command(configs_command(configs), target)

    def set_configs(self, configs: Iterable[ConfigLike] | None) -> None:
        """Configs pushed on each new stream's first heartbeat (None: push nothing)."""
        command = None if configs is None else list(configs)
        self._on_loop(lambda: self.center.grpc.set_configs(command))

    def disconnect(self, target: Target | int = "all") -> int:
        """End streams with UNAVAILABLE while the server keeps listening."""
        return self._on_loop(lambda: self.center.grpc.disconnect(target))

    def end(self, target: Target | int = "all") -> int:
        """End streams cleanly (OK) before the agent half-closed them."""
        return self._on_loop(lambda: self.center.grpc.end(target))

    def set_upload_status(self, failed: bool) -> None:
        """Answer later uploads with FAILED (True) or SUCCESS (False)."""
        response = grpc_pb2.FileUploadResponse
        self.center.grpc.upload_status = response.FAILED if failed else response.SUCCESS

    def set_sd_backends(self, backends: Iterable[BackendLike]) -> None:
        """Service discovery answer: (ip, port) or (ip, port, weight), in order."""
        self.center.sd.set_backends(backends)

    def set_sd_status(self, status: int) -> None:
        """HTTP status of every SD answer (200 = normal) to test the fallback ladder."""
        self.center.sd.set_status(status)
