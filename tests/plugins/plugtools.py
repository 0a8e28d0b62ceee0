"""Helpers for the plugin tests: real plugins on disk, a real HTTP server, the buffer's output."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import ssl
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import uvloop

from elkeid_agent.buffer import RecordBuffer
from elkeid_agent.commands import ConfigSpec
from elkeid_agent.config import PluginsConfig
from elkeid_agent.plugins.supervisor import PluginSupervisor

HERE = Path(__file__).resolve().parent
BIN = HERE / "bin"
REPO = HERE.parent.parent
FIXTURES = REPO / "tests" / "data" / "elkeid-go"

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a test coroutine on uvloop, the agent's loop."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def sh_plugin(body: str) -> bytes:
    return f"#!/bin/sh\n{body}\n".encode()


def py_plugin(name: str, **env: str) -> bytes:
    """A plugin executable running tests/plugins/bin/<name>.py with this interpreter."""
    exports = "".join(f"export {k}='{v}'\n" for k, v in env.items())
    return (
        f"#!/bin/sh\n{exports}export PYTHONPATH='{REPO}'\n"
        f"exec '{sys.executable}' '{BIN / name}.py' \"$@\"\n"
    ).encode()


def install_plugin(work: Path, name: str, exe: bytes) -> Path:
    """Put an executable where the supervisor looks for it; returns the plugin dir."""
    directory = work / "plugin" / name
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(exe)
    path.chmod(0o755)
    return directory


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def local_spec(name: str, exe: bytes, version: str = "1", detail: str = "") -> ConfigSpec:
    """A config whose executable is already on disk (signature = its sha256)."""
    return ConfigSpec(name=name, version=version, sha256=sha(exe), detail=detail)


def tar_gz(
    members: Mapping[str, bytes], extra: Callable[[tarfile.TarFile], None] | None = None
) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
        if extra is not None:
            extra(tar)
    return out.getvalue()


def read_frames(data: bytes) -> list[bytes]:
    frames = []
    pos = 0
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "little")
        frames.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return frames


def load_jsonl(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


class Files:
    """A real HTTP(S) server on 127.0.0.1 serving `files` (path -> body); logs requests.

    Paths in `chunked` are sent with chunked transfer coding, `redirects` maps a path to a
    Location, `stall` paths send half the body and hang.
    """

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.files: dict[str, bytes] = {}
        self.hits: list[str] = []
        self.chunked: set[str] = set()
        self.redirects: dict[str, str] = {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                owner.hits.append(self.path)
                if self.path in owner.redirects:
                    self.send_response(302)
                    self.send_header("Location", owner.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = owner.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                if self.path in owner.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(body), 1000):
                        part = body[i : i + 1000]
                        self.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(part), part))
                    self.wfile.write(b"0\r\nX-Trailer: 1\r\n\r\n")
                    return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.scheme = "http"
        if ssl_context is not None:
            self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.server.server_port}{path}"

    def __enter__(self) -> Files:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def files_server(ssl_context: ssl.SSLContext | None = None) -> Iterator[Files]:
    with Files(ssl_context) as f:
        yield f


def unique_cgroup_name() -> str:
    """A plugin cgroup group of its own per test run: test runs may overlap on one host."""
    return f"elkeid-test-{uuid.uuid4().hex[:12]}"


class Harness:
    """A supervisor running in the test's loop, with its buffer and helpers to wait on both.

    Unless `config` names one, its plugin cgroups go in a group unique to this harness."""

    def __init__(self, work: Path, config: PluginsConfig | None = None, max_bytes: int = 64 << 20):
        self.work = work
        self.buffer = RecordBuffer(max_bytes=max_bytes)
        config = config or PluginsConfig()
        if config.cgroup_name == PluginsConfig().cgroup_name:
            config = msgspec.structs.replace(config, cgroup_name=unique_cgroup_name())
        self.sup = PluginSupervisor(work, self.buffer, config)
        self.records: list[bytes] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Harness:
        self._task = asyncio.create_task(self.sup.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sup.stop()
        assert self._task is not None
        await asyncio.wait_for(self._task, 5)

    def drain(self) -> list[bytes]:
        while len(self.buffer):
            self.records += self.buffer.take(8 << 20).records
        return self.records

    async def wait_records(self, n: int, limit: float = 10.0) -> list[bytes]:
        deadline = time.monotonic() + limit
        while len(self.drain()) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.records)} records after {limit} s, wanted {n}")
            await asyncio.sleep(0.02)
        return self.records


async def until(cond: Callable[[], bool], limit: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def pids_in_group(pgid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            rest = stat[stat.rindex(")") + 2 :].split()
            if int(rest[2]) == pgid and rest[0] != "Z":
                out.append(int(entry))
    return out
