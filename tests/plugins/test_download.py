"""download.py and http.py against real servers on 127.0.0.1; the pure archive checks by table."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given
from hypothesis import strategies as st
from plugtools import files_server, run, sha, tar_gz

from elkeid_agent import http
from elkeid_agent.download import (
    DownloadError,
    UnsafeArchive,
    check_member,
    download_verified,
    extract_tar_gz,
    file_matches,
)
from elkeid_agent.plugins.orphans import GroupRecord, ProcInfo, is_plugin_process, parse_stat
from elkeid_center.certs import generate_certs, generate_server_cert


def test_content_length_chunked_and_redirects() -> None:
    body = bytes(range(256)) * 40

    async def main() -> None:
        with files_server() as files:
            files.files["/a"] = body
            files.files["/c"] = body
            files.chunked.add("/c")
            files.redirects["/r1"] = "/r2"
            files.redirects["/r2"] = files.url("/c")
            assert await http.fetch(files.url("/a"), timeout=5, max_bytes=len(body)) == body
            assert await http.fetch(files.url("/c"), timeout=5, max_bytes=len(body)) == body
            assert await http.fetch(files.url("/r1"), timeout=5, max_bytes=len(body)) == body
            with pytest.raises(http.TooLarge):
                await http.fetch(files.url("/a"), timeout=5, max_bytes=len(body) - 1)
            with pytest.raises(http.TooLarge):
                await http.fetch(files.url("/c"), timeout=5, max_bytes=len(body) - 1)
            with pytest.raises(http.HttpError, match="HTTP 404"):
                await http.fetch(files.url("/nope"), timeout=5, max_bytes=10)
            files.redirects["/loop"] = "/loop"
            with pytest.raises(http.HttpError, match="redirects"):
                await http.fetch(files.url("/loop"), timeout=5, max_bytes=10)
            with pytest.raises(http.HttpError, match="scheme"):
                await http.fetch("ftp://127.0.0.1/x", timeout=5, max_bytes=10)

    run(main())


def _stalling_server() -> tuple[socket.socket, list[socket.socket]]:
    """Answers with a Content-Length it never completes, and keeps the connection open."""
    server = socket.create_server(("127.0.0.1", 0))
    conns: list[socket.socket] = []

    def serve() -> None:
        conn, _ = server.accept()
        conns.append(conn)
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf")

    threading.Thread(target=serve, daemon=True).start()
    return server, conns  # the caller holds the connection open


def test_a_stalled_body_times_out_and_nothing_is_left(tmp_path: Path) -> None:
    server, conns = _stalling_server()
    port = server.getsockname()[1]

    async def main(tmp: Path) -> None:
        with pytest.raises(DownloadError, match=r"within 0\.5 s"):
            await download_verified([f"http://127.0.0.1:{port}/x"], "00" * 32, tmp, timeout=0.5)

    run(main(tmp_path))
    assert list(tmp_path.iterdir()) == []
    server.close()
    for conn in conns:
        conn.close()


def test_https_verifies_against_the_given_or_host_ca(tmp_path: Path) -> None:
    certs = generate_certs(tmp_path / "pki")
    cert, key = generate_server_cert(certs, tmp_path / "srv", names=("localhost",))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    body = b"artifact" * 1000

    async def main() -> None:
        with files_server(server_ctx) as files:
            files.files["/f"] = body
            url = files.url("/f", host="localhost")
            ctx = http.host_ssl_context(str(certs.ca))
            assert await http.fetch(url, timeout=5, max_bytes=len(body), ssl_context=ctx) == body
            # The host's store does not know the test CA: refused.
            with pytest.raises(http.HttpError):
                await http.fetch(url, timeout=5, max_bytes=len(body))
            path = await download_verified([url], sha(body), tmp_path, ssl_context=ctx)
            assert path.read_bytes() == body
            assert path.name.startswith(".download-")

    run(main())


def test_host_ca_store_is_found() -> None:
    ctx = http.host_ssl_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.cert_store_stats()["x509_ca"] > 0


def test_file_matches(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x")
    assert file_matches(f, sha(b"x").upper())
    assert not file_matches(f, sha(b"y"))
    assert not file_matches(f, "")
    assert not file_matches(tmp_path / "missing", sha(b"x"))
    assert not file_matches(tmp_path, sha(b"x"))


@pytest.mark.parametrize(
    ("name", "kind", "ok"),
    [
        ("plugin", "file", "plugin"),
        ("./plugin", "file", "plugin"),
        ("a/b/c", "file", "a/b/c"),
        ("dir/", "dir", "dir"),
        (".", "dir", None),
        ("./", "dir", None),
        ("../x", "file", UnsafeArchive),
        ("a/../../x", "file", UnsafeArchive),
        ("a/..", "dir", UnsafeArchive),
        ("/etc/passwd", "file", UnsafeArchive),
        ("//x", "file", UnsafeArchive),
        ("x", "link", UnsafeArchive),
        ("x", "device", UnsafeArchive),
        ("x", "fifo", UnsafeArchive),
        (".", "file", UnsafeArchive),
        ("a\x00b", "file", UnsafeArchive),
    ],
)
def test_check_member(name: str, kind: str, ok: object) -> None:
    if ok is UnsafeArchive:
        with pytest.raises(UnsafeArchive):
            check_member(name, kind, 1)
    else:
        result = check_member(name, kind, 1)
        assert result == (None if ok is None else PurePosixPath(str(ok)))


@given(st.text(max_size=40))
def test_an_accepted_member_never_leaves_the_directory(name: str) -> None:
    try:
        rel = check_member(name, "file", 0)
    except UnsafeArchive:
        return
    assert rel is not None
    assert not rel.is_absolute()
    assert ".." not in rel.parts


def test_extract_caps_size_and_refuses_duplicates(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_gz({"big": b"\0" * 5000}))
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(UnsafeArchive, match="more than 4096"):
        extract_tar_gz(archive, dest, max_bytes=4096)
    assert list(dest.iterdir()) == []
    archive.write_bytes(b"not a tarball")
    with pytest.raises(UnsafeArchive, match="cannot unpack"):
        extract_tar_gz(archive, dest)


def test_orphan_identity_rules() -> None:
    record = GroupRecord(pgid=100, start_ticks=5000, boot_id="b", directory="/w/plugin/p")
    leader = ProcInfo(100, 100, 5000, "/bin/sh", "/")
    assert is_plugin_process(leader, record)
    reused = ProcInfo(100, 100, 9000, "/w/plugin/p/p", "/w/plugin/p")
    assert not is_plugin_process(reused, record)  # same pid, later start: someone else
    member = ProcInfo(101, 100, 5001, "/usr/bin/sleep", "/w/plugin/p")
    assert is_plugin_process(member, record)
    assert is_plugin_process(ProcInfo(102, 100, 5001, "/w/plugin/p/p (deleted)", "/"), record)
    assert not is_plugin_process(ProcInfo(103, 100, 5001, "/usr/bin/sleep", "/tmp"), record)
    assert not is_plugin_process(ProcInfo(104, 100, 4000, "/w/plugin/p/p", "/w/plugin/p"), record)
    assert not is_plugin_process(ProcInfo(105, 7, 5001, "/w/plugin/p/p", "/w/plugin/p"), record)
    assert not is_plugin_process(
        ProcInfo(106, 100, 5001, "/w/plugin/p2/p2", "/w/plugin/p2"), record
    )


def test_parse_stat_with_a_hostile_comm() -> None:
    text = "4242 (a) b) (c) S 1 4240 4240 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 123456 0 0"
    assert parse_stat(text) == (4240, 123456)


def test_asyncio_loop_is_uvloop() -> None:
    async def main() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run(main()).startswith("uvloop")
