"""Issue 9, the download host: whatever a plugin's download server answers, the download fails
alone (the plugin is reported, nothing half-written stays) and the agent goes on.

The hostile host (hostile.py) scripts each answer. Every case ends with `rig.survived()`.
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Iterator

import pytest
from faultrig import BASE, BASE_EXE, MIB, Rig, RssSampler, case, sh_plugin, sha
from hostile import Hostile, Progress, body, endless_headers, raw, redirect, stall, stream

from elkeid_center.certs import https_context

GOOD_EXE = sh_plugin("exec cat <&3 >/dev/null")
RSS_LIMIT = 100 * MIB


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = Rig(tmp_path_factory.mktemp("fault-download"))
    # The agent trusts the center's CA for HTTPS downloads the way an operator would make a
    # private CA trusted: OpenSSL's SSL_CERT_FILE (host_ssl_context loads the default paths).
    rig.env["SSL_CERT_FILE"] = str(rig.center.certs.ca)
    with rig:
        yield rig


@pytest.fixture
def rig(shared: Rig) -> Iterator[Rig]:
    yield from case(shared)


def _push(rig: Rig, name: str, url: str, exe: bytes = GOOD_EXE, **extra: str) -> float:
    since = time.time()
    entry = {"name": name, "version": "1", "sha256": sha(exe), "download_urls": [url], **extra}
    rig.center.send_configs([rig.publish(BASE, BASE_EXE), entry])
    return since


def _refused(rig: Rig, name: str, since: float, timeout: float = 20.0) -> None:
    """The plugin is reported in state_detail, never ran, and left no partial download."""
    rig.refused(since, name, timeout)
    leftovers = list((rig.plugin_root / name).glob(".download-*"))
    leftovers += list((rig.plugin_root / name).glob(".staging-*"))
    assert not leftovers


def test_a_200_kb_chunk_size_line(rig: Rig) -> None:
    rig.hostile.routes["/p"] = raw(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 200_000 + b"\r\n"
    )
    since = _push(rig, "chunkline", rig.hostile.url("/p"))
    _refused(rig, "chunkline", since)
    rig.survived()


def test_content_length_minus_one(rig: Rig) -> None:
    rig.hostile.routes["/p"] = raw(
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\nConnection: close\r\n\r\n" + GOOD_EXE
    )
    since = _push(rig, "negative", rig.hostile.url("/p"))
    _refused(rig, "negative", since)
    rig.survived()


def test_non_numeric_content_length(rig: Rig) -> None:
    rig.hostile.routes["/p"] = raw(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1e3\r\nConnection: close\r\n\r\n" + GOOD_EXE
    )
    since = _push(rig, "nonnumeric", rig.hostile.url("/p"))
    _refused(rig, "nonnumeric", since)
    rig.survived()


def test_300_mb_without_length_streams_in_bounded_memory(rig: Rig) -> None:
    progress = Progress()
    total = 300 * 1000 * 1000
    rig.hostile.routes["/p"] = stream(
        total, progress, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
    )
    with RssSampler(rig.pid) as rss:
        since = _push(rig, "bigstream", rig.hostile.url("/p"))
        rig.wait(progress.done.is_set, 120, "the 300 MB body sent or refused")
        _refused(rig, "bigstream", since)
    assert rss.samples > 10
    assert rss.peak < RSS_LIMIT, f"agent RSS peaked at {rss.peak / MIB:.1f} MiB"
    rig.survived()


def test_endless_headers(rig: Rig) -> None:
    progress = Progress()
    rig.hostile.routes["/p"] = endless_headers(progress)
    with RssSampler(rig.pid) as rss:
        since = _push(rig, "endless", rig.hostile.url("/p"))
        _refused(rig, "endless", since)
    # The agent hung up on its own, after a bounded amount of header.
    rig.wait(progress.done.is_set, 10, "the agent closing the endless header stream")
    assert progress.broken
    assert progress.sent < 16 * MIB
    assert rss.peak < RSS_LIMIT
    rig.survived()


def test_a_server_that_stalls_mid_body(rig: Rig) -> None:
    rig.hostile.routes["/p"] = stall(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000
    )
    since = _push(rig, "stalled", rig.hostile.url("/p"))
    rig.wait(lambda: rig.hostile.paths().count(b"/p"), 10, "the download to start")
    # While the download hangs: heartbeats, and tasks are still answered.
    time.sleep(2)
    rig.beat_after(time.time(), timeout=5)
    rig.center.send_task(1, "nobody", "", "stall-task")
    assert rig.result("stall-task", timeout=5)["status"] == "failed"
    rig.hostile.release()  # the server gives up; so must the download
    _refused(rig, "stalled", since)
    rig.survived()


def test_a_redirect_loop(rig: Rig) -> None:
    rig.hostile.routes["/loop"] = redirect("/loop")
    since = _push(rig, "looping", rig.hostile.url("/loop"))
    _refused(rig, "looping", since)
    assert 1 <= rig.hostile.paths().count(b"/loop") <= 20
    rig.survived()


@pytest.fixture
def tls_host(rig: Rig) -> Iterator[Hostile]:
    with Hostile(https_context(rig.center.certs, "127.0.0.1")) as host:
        yield host


def test_an_https_to_http_redirect_is_not_followed(rig: Rig, tls_host: Hostile) -> None:
    tls_host.routes["/direct"] = body(GOOD_EXE)
    tls_host.routes["/down"] = redirect(rig.hostile.url("/plain"))
    rig.hostile.routes["/plain"] = body(GOOD_EXE)
    # Control: the agent does trust the test CA, so a refusal below is the downgrade's.
    since = _push(rig, "tlsok", tls_host.url("/direct"))
    rig.plugin_beat_after(since, "tlsok")
    since = _push(rig, "downgrade", tls_host.url("/down"))
    _refused(rig, "downgrade", since)
    assert tls_host.paths().count(b"/down") >= 1
    assert b"/plain" not in rig.hostile.paths(), "the agent followed https -> http"
    rig.survived()


def _ustar_header(name: bytes, size: int, mode: int) -> bytes:
    """One ustar header block, built by hand (tarfile takes ~20 s for 100,000 members)."""
    header = bytearray(512)
    header[100:108] = b"%07o\0" % mode
    header[108:116] = header[116:124] = b"0000000\0"
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"%011o\0" % 1_700_000_000
    header[148:156] = b" " * 8
    header[156:157] = b"0"
    header[257:265] = b"ustar\x0000"
    checksum = sum(header) + sum(name)  # the checksum field counts as spaces
    header[0 : len(name)] = name
    header[148:156] = b"%06o\0 " % checksum
    return bytes(header)


def _empty_members(count: int) -> bytes:
    """`count` empty files e0, e1, ...: one template header, the name and checksum patched."""
    template = _ustar_header(b"", 0, 0o644)
    base = sum(template[:148]) + sum(template[156:]) + 8 * ord(" ")
    out = bytearray()
    for i in range(count):
        name = b"e%d" % i
        out += name + template[len(name) : 148] + b"%06o\0 " % (base + sum(name))
        out += template[156:]
    return bytes(out)


@pytest.fixture(scope="module")
def many_members() -> bytes:
    """A tar.gz of the plugin's executable and 100,000 empty members."""
    exe = GOOD_EXE + b"\0" * (-len(GOOD_EXE) % 512)
    parts = [_ustar_header(b"manymembers", len(GOOD_EXE), 0o755), exe]
    parts += [_empty_members(100_000), b"\0" * 1024]
    return gzip.compress(b"".join(parts), compresslevel=1)


def test_a_tar_gz_with_100000_empty_members(rig: Rig, many_members: bytes) -> None:
    rig.hostile.routes["/p.tar.gz"] = body(many_members)
    with RssSampler(rig.pid) as rss:
        since = _push(
            rig, "manymembers", rig.hostile.url("/p.tar.gz"), many_members, type="tar.gz"
        )
        _refused(rig, "manymembers", since, timeout=30)
    assert not (rig.plugin_root / "manymembers" / "e0").exists()
    assert rss.peak < RSS_LIMIT, f"agent RSS peaked at {rss.peak / MIB:.1f} MiB"
    # The breach of the cap is counted in the heartbeat.
    rig.wait(
        lambda: [b for b in rig.beats(since) if int(b.fields.get("archive_member_cap", 0)) > 0],
        10,
        "archive_member_cap counted",
    )
    rig.survived()
