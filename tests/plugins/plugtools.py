"""Helpers for the plugin tests: real plugins on disk, a real HTTP server, the buffer's output."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import sys
import tarfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from elkeid_agent.buffer import RecordBuffer
from elkeid_agent.commands import ConfigSpec
from elkeid_agent.config import PluginsConfig
from elkeid_agent.plugins.supervisor import PluginSupervisor

HERE = Path(__file__).resolve().parent
BIN = HERE / "bin"
REPO = HERE.parent.parent
FIXTURES = REPO.parent / "shared" / "fixtures" / "elkeid-go"

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


def tar_gz(members: Mapping[str, bytes], extra: Callable[[tarfile.TarFile], None] | None = None) -> bytes:
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
    """A real HTTP server on 127.0.0.1 serving `files` (path -> body); counts requests."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.hits: list[str] = []
        files = self.files
        hits = self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                body = files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def __enter__(self) -> Files:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def files_server() -> Iterator[Files]:
    with Files() as f:
        yield f


class Harness:
    """A supervisor running in the test's loop, with its buffer and helpers to wait on both."""

    def __init__(self, work: Path, config: PluginsConfig | None = None, max_bytes: int = 64 << 20):
        self.work = work
        self.buffer = RecordBuffer(max_bytes=max_bytes)
        self.sup = PluginSupervisor(work, self.buffer, config or PluginsConfig())
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

    async def wait_records(self, n: int, timeout: float = 10.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.drain()) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.records)} records after {timeout} s, wanted {n}")
            await asyncio.sleep(0.02)
        return self.records


async def until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.05)


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
