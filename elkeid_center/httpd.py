"""A minimal asyncio HTTP/1.1 server, and the center's three uses of it.

- ServiceDiscovery: `GET /registry/detail?name=hids_svr_grpc&count=10` (PROTOCOL.md 4).
- FileServer: static downloads for plugins and upgrades, recording what was asked for.
- the CLI's admin endpoint (cli.Admin).

One request per connection (`Connection: close`): the agent's fetches are one-shot,
and it keeps the parser small. No new dependencies.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
FILE_CHUNK = 64 * 1024
# A client that sends nothing is dropped after this long.
REQUEST_TIMEOUT_S = 30.0
SD_SERVICE_NAME = "hids_svr_grpc"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes | Path = b""
    content_type: str = "text/plain; charset=utf-8"

    @classmethod
    def json(cls, value: Any, status: int = 200) -> Response:
        return cls(status, json.dumps(value).encode(), "application/json")

    @classmethod
    def text(cls, status: int, text: str = "") -> Response:
        return cls(status, (text or HTTPStatus(status).phrase).encode() + b"\n")


Handler = Callable[[Request], Awaitable[Response]]


class _BadRequest(Exception):
    pass


async def _read_request(reader: asyncio.StreamReader) -> Request:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as e:
        raise _BadRequest("headers too large") from e
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, _version = lines[0].split(" ", 2)
    except ValueError as e:
        raise _BadRequest(f"bad request line {lines[0]!r}") from e
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or "0")
    if not 0 <= length <= MAX_BODY_BYTES:
        raise _BadRequest("bad content-length")
    body = await reader.readexactly(length) if length else b""
    parts = urlsplit(target)
    return Request(method.upper(), unquote(parts.path), parse_qs(parts.query), headers, body)


class HttpServer:
    """Serves `handler` on host:port (0 = pick a free port) until closed."""

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(
            self._serve,
            self.host,
            self.port,
            ssl=self.ssl_context,
            limit=MAX_HEADER_BYTES,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                request = await asyncio.wait_for(_read_request(reader), REQUEST_TIMEOUT_S)
            except (_BadRequest, ValueError, asyncio.IncompleteReadError, TimeoutError) as e:
                await _send(writer, "GET", Response.text(400, str(e)))
                return
            await _send(writer, request.method, await self.handler(request))
        except (ConnectionError, ssl.SSLError):
            # The client went away mid-response: nothing to answer to.
            return
        finally:
            writer.close()


async def _send(writer: asyncio.StreamWriter, method: str, response: Response) -> None:
    size = response.body.stat().st_size if isinstance(response.body, Path) else len(response.body)
    head = (
        f"HTTP/1.1 {response.status} {HTTPStatus(response.status).phrase}\r\n"
        f"Content-Type: {response.content_type}\r\n"
        f"Content-Length: {size}\r\n"
        "Connection: close\r\n\r\n"
    )
    writer.write(head.encode("latin-1"))
    if method != "HEAD":
        if isinstance(response.body, Path):
            with response.body.open("rb") as f:
                while chunk := f.read(FILE_CHUNK):
                    writer.write(chunk)
                    await writer.drain()
        else:
            writer.write(response.body)
    await writer.drain()


@dataclass(frozen=True)
class Backend:
    ip: str
    port: int
    weight: int = 1


BackendLike = Backend | tuple[str, int] | tuple[str, int, int]


def _backend(value: BackendLike) -> Backend:
    return value if isinstance(value, Backend) else Backend(*value)


@dataclass
class ServiceDiscovery:
    """The ServiceDiscovery registry's read side, answering with a configurable list.

    `status` other than 200 makes every lookup fail, for tests of the fallback ladder.
    """

    backends: list[Backend] = field(default_factory=list)
    status: int = 200
    requests: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def set_backends(self, backends: Iterable[BackendLike]) -> None:
        new = [_backend(b) for b in backends]
        with self._lock:
            self.backends = new

    def set_status(self, status: int) -> None:
        with self._lock:
            self.status = status

    def request_log(self) -> list[str]:
        with self._lock:
            return list(self.requests)

    async def handle(self, request: Request) -> Response:
        with self._lock:
            self.requests.append(f"{request.method} {request.path}")
            backends, status = list(self.backends), self.status
        if request.path != "/registry/detail" or request.method not in ("GET", "HEAD"):
            return Response.text(404)
        if status != 200:
            return Response.text(status)
        name = request.query.get("name", [""])[0]
        try:
            count = int(request.query.get("count", ["10"])[0])
        except ValueError:
            return Response.json({"msg": "bad count", "data": []}, 400)
        now = int(time.time())
        # The fields beyond ip/port/weight are the registry's own; clients must ignore them.
        data = [
            {
                "name": name,
                "ip": b.ip,
                "port": b.port,
                "status": 0,
                "create_at": now,
                "update_at": now,
                "weight": b.weight,
                "extra": {},
            }
            for b in (backends if name == SD_SERVICE_NAME else [])[: max(count, 0)]
        ]
        return Response.json({"msg": "ok", "data": data})


@dataclass
class FileServer:
    """Serves the files under `root` (None: nothing); `requests` lists every path
    asked for, in order."""

    root: Path | None
    requests: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def request_log(self) -> list[str]:
        with self._lock:
            return list(self.requests)

    async def handle(self, request: Request) -> Response:
        with self._lock:
            self.requests.append(request.path)
        if request.method not in ("GET", "HEAD"):
            return Response.text(405)
        if self.root is None:
            return Response.text(404)
        root = self.root.resolve()
        try:
            path = (root / request.path.lstrip("/")).resolve()
        except (ValueError, OSError):  # e.g. a NUL byte, or a symlink loop
            return Response.text(404)
        # No escaping the served directory through `..` or symlinks.
        if not path.is_relative_to(root) or not path.is_file():
            return Response.text(404)
        return Response(200, path, "application/octet-stream")
