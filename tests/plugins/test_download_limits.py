"""Downloads and archives under hostile sizes: bounded memory, a full disk, member floods,
and the plugin executable checked against the Config's signature before it runs."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import psutil
import pytest
from floods import member_flood_tar_gz
from plugtools import REPO, Harness, files_server, run, sha, tar_gz

from elkeid_agent.commands import ConfigSpec
from elkeid_agent.download import (
    MAX_ARCHIVE_MEMBERS,
    MEMBER_CAP_COUNTER,
    UnsafeArchive,
    extract_tar_gz,
)
from elkeid_agent.plugins import install

MiB = 1024 * 1024
BLOCK = hashlib.sha256(b"seed").digest() * (MiB // 32)


class StreamingServer:
    """Serves `blocks` MiB to each connection, with no length (close-delimited), from a thread."""

    def __init__(self, blocks: int) -> None:
        self.blocks = blocks
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/big"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                    for _ in range(self.blocks):
                        conn.sendall(BLOCK)
                except OSError:
                    pass  # the client gave up: what the test is about

    def close(self) -> None:
        self.sock.close()


# The downloading process: the agent's download path alone, on uvloop, measuring how late a
# 10 ms ticker runs while the body streams (the plugin pipes share that loop).
CHILD = """
import asyncio, json, resource, signal, sys, time
from pathlib import Path
import uvloop
from elkeid_agent.download import download_verified, DownloadError

url, digest, directory, fsize = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
if fsize:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

async def main():
    lag = 0.0
    async def ticker():
        nonlocal lag
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            lag = max(lag, time.monotonic() - before - 0.01)
    tick = asyncio.get_running_loop().create_task(ticker())
    try:
        path = await download_verified([url], digest, directory, max_bytes=400 << 20, timeout=300)
        result = {"size": path.stat().st_size}
        path.unlink()
    except DownloadError as exc:
        result = {"error": str(exc), "kind": type(exc).__name__}
    tick.cancel()
    result["lag"] = lag
    # VmHWM: this process's own peak (ru_maxrss would include the parent's from before exec).
    status = Path("/proc/self/status").read_text()
    result["peak_kib"] = int(status.split("VmHWM:")[1].split()[0])
    print(json.dumps(result))

with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
    runner.run(main())
"""


def download_in_child(url: str, digest: str, directory: Path, fsize: int = 0) -> tuple[dict, int]:
    """Run the download in a child process; its result and its peak RSS as psutil saw it."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, url, digest, str(directory), str(fsize)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    watched = psutil.Process(child.pid)
    peak = 0
    deadline = time.monotonic() + 240
    while child.poll() is None:
        assert time.monotonic() < deadline, "the download did not finish"
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    out, err = child.communicate()
    assert child.returncode == 0, err.decode()
    return json.loads(out), peak


def test_a_300_mb_body_streams_in_bounded_memory(tmp_path: Path) -> None:
    blocks = 300
    digest = hashlib.sha256()
    for _ in range(blocks):
        digest.update(BLOCK)
    server = StreamingServer(blocks)
    try:
        result, peak = download_in_child(server.url, digest.hexdigest(), tmp_path)
    finally:
        server.close()
    assert result.get("size") == blocks * MiB, result
    print(f"300 MiB download: peak RSS {peak / MiB:.1f} MiB (psutil samples), "
          f"{result['peak_kib'] / 1024:.1f} MiB (VmHWM), loop lag {result['lag']:.3f} s")
    assert peak < 100 * MiB
    assert result["peak_kib"] * 1024 < 100 * MiB
    # Generous for a loaded 2-core machine; the old inline fsync of 300 MiB took seconds.
    assert result["lag"] < 1.0
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_ends_the_download_and_leaves_nothing(tmp_path: Path) -> None:
    """RLIMIT_FSIZE stands in for a full disk: the write fails with an OSError mid-body."""
    server = StreamingServer(8)
    try:
        result, _ = download_in_child(server.url, "00" * 32, tmp_path, fsize=2 * MiB)
    finally:
        server.close()
    assert result.get("kind") == "WriteFailed", result
    assert "File too large" in result["error"]
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def member_flood(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tar.gz of 100,000 empty files (51 MB of tar headers, ~1 MB compressed)."""
    path = tmp_path_factory.mktemp("flood") / "flood.tar.gz"
    path.write_bytes(member_flood_tar_gz(100_000))
    return path


def test_an_archive_of_100000_empty_members_is_refused_fast(
    member_flood: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    with pytest.raises(UnsafeArchive, match=f"more than {MAX_ARCHIVE_MEMBERS} members") as info:
        extract_tar_gz(member_flood, tmp_path)
    elapsed = time.monotonic() - started
    assert info.value.counter == MEMBER_CAP_COUNTER
    assert list(tmp_path.iterdir()) == []
    # Again under tracemalloc (which slows tarfile several times): what it holds at the peak.
    tracemalloc.start()
    try:
        with pytest.raises(UnsafeArchive):
            extract_tar_gz(member_flood, tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"100,000-member tar.gz refused in {elapsed:.2f} s, peak {peak / MiB:.1f} MiB traced")
    assert elapsed < 10
    assert peak < 32 * MiB


def test_members_up_to_the_cap_unpack(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_gz({f"d/f{i}": b"%d" % i for i in range(50)}))
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(UnsafeArchive, match="more than 49 members"):
        extract_tar_gz(archive, dest, max_members=49)
    assert list(dest.iterdir()) == []
    extract_tar_gz(archive, dest, max_members=50)
    assert (dest / "d" / "f42").read_bytes() == b"42"


EXE = b"#!/bin/sh\nexec sleep 30\n"


def _prepare(tmp_path: Path, spec: ConfigSpec) -> Path:
    directory = tmp_path / "plugin" / spec.name
    directory.mkdir(parents=True)

    async def main() -> None:
        with pytest.raises(install.InstallError, match="not the signature") as info:
            await install.prepare(directory, spec, max_bytes=MiB, ssl_context=None)
        assert sha(EXE) in str(info.value)

    run(main())
    return directory


def test_a_tar_gz_whose_executable_misses_the_signature_is_not_installed(tmp_path: Path) -> None:
    archive = tar_gz({"p": EXE, "lib/x": b"x"})
    with files_server() as files:
        files.files["/p.tar.gz"] = archive
        spec = ConfigSpec(name="p", type="tar.gz", version="1", sha256=sha(archive),
                          signature=sha(b"another executable"),
                          download_urls=(files.url("/p.tar.gz"),))
        directory = _prepare(tmp_path, spec)
    assert list(directory.iterdir()) == []


def test_a_bare_executable_missing_the_signature_is_not_installed(tmp_path: Path) -> None:
    with files_server() as files:
        files.files["/p"] = EXE
        spec = ConfigSpec(name="p", version="1", sha256=sha(EXE), signature=sha(b"other"),
                          download_urls=(files.url("/p"),))
        directory = _prepare(tmp_path, spec)
    assert list(directory.iterdir()) == []


def test_the_supervisor_never_starts_a_mismatching_plugin(tmp_path: Path) -> None:
    archive = tar_gz({"s": EXE})

    async def main() -> None:
        with files_server() as files:
            files.files["/s.tar.gz"] = archive
            spec = ConfigSpec(name="s", type="tar.gz", version="1", sha256=sha(archive),
                              signature=sha(b"not it"), download_urls=(files.url("/s.tar.gz"),))
            async with Harness(tmp_path) as h:
                await h.sup.sync([spec])
                assert any("not the signature" in e for e in h.sup.errors())
        assert not (tmp_path / "plugin" / "s" / "s").exists()

    run(main())
