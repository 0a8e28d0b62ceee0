"""A small HTTP/1.1 GET client on asyncio streams: plugin downloads, self-upgrade, discovery.

Why not urllib or a library: urllib blocks the event loop, and the agent takes no new runtime
dependency. Only what the agent needs is here: GET, `Content-Length`, chunked and
read-until-close bodies, redirects (301/302/303/307/308), one overall deadline, a byte cap, and
HTTPS verified against the host's CA store (`host_ssl_context`).

The body is streamed to a `sink` callable chunk by chunk, so a 512 MiB download never sits in
memory; `fetch` collects small bodies (service discovery answers) into bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

#: Where distributions keep their CA bundle. A frozen executable carries its own OpenSSL whose
#: compiled-in default path may not exist on the host, so we look for the host's file ourselves.
CA_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Gentoo, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",  # RHEL, CentOS, Fedora
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",  # RHEL 7+ extracted trust
    "/etc/ssl/ca-bundle.pem",  # openSUSE, SLES
    "/var/lib/ca-certificates/ca-bundle.pem",  # SLES 12+
    "/etc/ssl/cert.pem",  # Alpine, also macOS-like layouts
)
CA_DIRS = ("/etc/ssl/certs", "/etc/pki/tls/certs")

MAX_REDIRECTS = 5
#: Status line plus headers; a server sending more is not one we want to talk to.
MAX_HEADER_BYTES = 64 * 1024
READ_CHUNK = 256 * 1024


class HttpError(Exception):
    """A request that did not produce a complete 200 body; the message says why."""


class TooLarge(HttpError):
    """The body exceeds the caller's cap."""


def host_ssl_context(cafile: str | None = None) -> ssl.SSLContext:
    """A client context verifying against `cafile` or the host's CA store.

    The first existing bundle of CA_BUNDLES is loaded; if none exists, the hashed directories
    of CA_DIRS; the library's default paths are loaded too, which is harmless when absent.
    """
    ctx = ssl.create_default_context(cafile=cafile)
    if cafile is None:
        bundle = next((p for p in CA_BUNDLES if os.path.isfile(p)), None)
        if bundle is not None:
            ctx.load_verify_locations(cafile=bundle)
        else:
            for directory in CA_DIRS:
                if os.path.isdir(directory):
                    ctx.load_verify_locations(capath=directory)
    return ctx


def _split(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise HttpError(f"unsupported URL scheme in {url!r}")
    if not parts.hostname:
        raise HttpError(f"no host in {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, parts.hostname, port, target


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith("HTTP/1."):
        raise HttpError(f"bad status line {lines[0][:80]!r}")
    try:
        status = int(status_line[1])
    except ValueError as exc:
        raise HttpError(f"bad status line {lines[0][:80]!r}") from exc
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise HttpError(f"bad header line {line[:80]!r}")
        key = name.strip().lower()
        value = value.strip()
        # Repeated headers are joined, as RFC 9110 allows for list-valued fields.
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return status, headers


async def _read_chunked(
    reader: asyncio.StreamReader, sink: Callable[[bytes], None], budget: int
) -> int:
    total = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError as exc:
            raise HttpError(f"bad chunk size {size_text[:20]!r}") from exc
        if size == 0:
            # Trailer section: header lines up to an empty line.
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return total
        total += size
        if total > budget:
            raise TooLarge(f"body exceeds {budget} bytes")
        remaining = size
        while remaining:
            data = await reader.read(min(remaining, READ_CHUNK))
            if not data:
                raise HttpError("connection closed inside a chunk")
            remaining -= len(data)
            sink(data)
        if await reader.readexactly(2) != b"\r\n":
            raise HttpError("chunk not followed by CRLF")


async def _read_body(
    reader: asyncio.StreamReader,
    headers: dict[str, str],
    sink: Callable[[bytes], None],
    max_bytes: int,
) -> int:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(reader, sink, max_bytes)
    length_text = headers.get("content-length")
    if length_text is not None:
        try:
            length = int(length_text)
        except ValueError as exc:
            raise HttpError(f"bad Content-Length {length_text[:20]!r}") from exc
        if length > max_bytes:
            raise TooLarge(f"Content-Length {length} exceeds {max_bytes} bytes")
        remaining = length
        while remaining:
            data = await reader.read(min(remaining, READ_CHUNK))
            if not data:
                raise HttpError(f"connection closed after {length - remaining} of {length} bytes")
            remaining -= len(data)
            sink(data)
        return length
    total = 0
    while data := await reader.read(READ_CHUNK):
        total += len(data)
        if total > max_bytes:
            raise TooLarge(f"body exceeds {max_bytes} bytes")
        sink(data)
    return total


async def _get_once(
    url: str,
    sink: Callable[[bytes], None],
    max_bytes: int,
    ssl_context: ssl.SSLContext | None,
) -> tuple[int, str | None, int]:
    """One request: (status, Location for redirects, body bytes delivered to the sink)."""
    scheme, host, port, target = _split(url)
    tls = (ssl_context or host_ssl_context()) if scheme == "https" else None
    try:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls, limit=MAX_HEADER_BYTES, server_hostname=host if tls else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise HttpError(f"cannot connect to {host}:{port}: {exc}") from exc
    try:
        default_port = 443 if scheme == "https" else 80
        host_header = host if port == default_port else f"{host}:{port}"
        if ":" in host and not host.startswith("["):
            host_header = f"[{host}]" if port == default_port else f"[{host}]:{port}"
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: elkeid-agent\r\n"
            "Accept-Encoding: identity\r\nConnection: close\r\n\r\n"
        )
        writer.write(request.encode("ascii"))
        await writer.drain()
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError as exc:
            raise HttpError("response headers too large") from exc
        status, headers = _parse_head(head[:-4])
        if status in (301, 302, 303, 307, 308):
            return status, headers.get("location"), 0
        if status != 200:
            return status, None, 0
        return status, None, await _read_body(reader, headers, sink, max_bytes)
    except asyncio.IncompleteReadError as exc:
        raise HttpError("connection closed early") from exc
    except (OSError, ssl.SSLError) as exc:
        raise HttpError(f"{host}:{port}: {exc}") from exc
    finally:
        writer.close()
        # The body is complete or already failed: a close error changes nothing.
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def get(
    url: str,
    sink: Callable[[bytes], None],
    *,
    timeout: float,  # noqa: ASYNC109 - one deadline over connect, redirects and body
    max_bytes: int,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """GET `url`, following redirects, streaming the 200 body into `sink`; returns its size.

    Raises HttpError (TooLarge for the cap, and on timeout) on anything but a complete body.
    The sink may have received part of a body before an error: callers discard it then.
    """
    try:
        async with asyncio.timeout(timeout):
            for _ in range(MAX_REDIRECTS + 1):
                status, location, size = await _get_once(url, sink, max_bytes, ssl_context)
                if status == 200:
                    return size
                if location is None:
                    raise HttpError(f"HTTP {status} from {url}")
                url = urljoin(url, location)
            raise HttpError(f"more than {MAX_REDIRECTS} redirects")
    except TimeoutError as exc:
        raise HttpError(f"no complete answer from {url} within {timeout:g} s") from exc


async def fetch(
    url: str,
    *,
    timeout: float,  # noqa: ASYNC109 - passed on to get()
    max_bytes: int,
    ssl_context: ssl.SSLContext | None = None,
) -> bytes:
    """GET a small body into memory (service discovery, metadata)."""
    parts: list[bytes] = []
    await get(url, parts.append, timeout=timeout, max_bytes=max_bytes, ssl_context=ssl_context)
    return b"".join(parts)
