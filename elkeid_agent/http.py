"""HTTP/1.1 GET for plugin downloads, the self-upgrade and service discovery: h11 on asyncio.

h11 parses every byte a server sends (status line, headers, Content-Length, chunked and
close-delimited bodies); this module adds the agent's policy and drives the sockets:

* limits: the header block and any one chunk-size line (h11's `max_incomplete_event_size`);
  the body, refused from Content-Length up front and counted while it streams whatever its
  framing; one deadline over connect, headers and body of every hop of a request;
* redirects (301/302/303/307/308): at most MAX_REDIRECTS, never from https to http, never
  back to a URL already visited;
* proxies from the environment as Go's agent uses them (proxyenv.py): an absolute-form target
  through an http proxy, a CONNECT tunnel for https;
* HTTPS verified against the host's CA store (`host_ssl_context`) or the given context.

Whatever a server, a proxy or the network does ends in HttpError (TooLarge, Timeout) with a
reason; what the body `sink` raises (a full disk) passes through unchanged. The pure policy
(`parse_url`, `follow_redirect`, `check_length`) is separate from the I/O below it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urljoin, urlsplit, urlunsplit

import h11

from elkeid_agent.proxyenv import Proxy, ProxyConfigError, ProxySettings
from elkeid_agent.redact import redact

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

MAX_REDIRECTS = 3
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: Status line plus headers, and separately any one chunk-size line: h11 refuses more.
MAX_HEADER_BYTES = 64 * 1024
#: 1xx answers before the real one; a server sending them without end is not one to wait for.
MAX_INTERIM_RESPONSES = 8
READ_SIZE = 64 * 1024
#: A server's words quoted in a reason are cut here: reasons end up in logs and heartbeats.
MAX_QUOTE = 200
USER_AGENT = "elkeid-agent"

T = TypeVar("T")
#: Receives the body as it arrives; may raise (the exception ends the request unchanged).
Sink = Callable[[bytes], Awaitable[None]]


class HttpError(Exception):
    """A request that did not produce a complete 200 body; the message says why (with the
    credentials of any URL in it masked: reasons go to logs, heartbeats and status.json)."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


class TooLarge(HttpError):
    """The body exceeds the caller's cap."""


class Timeout(HttpError):
    """The request's deadline passed before the body was complete."""


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


# -- policy (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Url:
    scheme: str
    host: str
    port: int
    #: Path and query (origin form).
    target: str
    #: The URL without its fragment: what messages quote and the redirect loop check compares.
    text: str

    @property
    def default_port(self) -> bool:
        return self.port == (443 if self.scheme == "https" else 80)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def authority(self) -> str:
        """The Host header: the port only when it is not the scheme's."""
        return self.address.rpartition(":")[0] if self.default_port else self.address


def _quote(text: str) -> str:
    text = redact(text)  # before the cut, which could leave a URL without its `@`
    return repr(text[:MAX_QUOTE] + ("..." if len(text) > MAX_QUOTE else ""))


def parse_url(text: str) -> Url:
    """An http(s) URL the client can request; HttpError naming what is wrong otherwise."""
    # Control characters, spaces and non-ASCII never reach a socket or a request line.
    if not text.isascii() or any(not "!" <= c <= "~" for c in text):
        raise HttpError(f"URL {_quote(text)} has a control, space or non-ASCII character")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise HttpError(f"malformed URL {_quote(text)}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise HttpError(f"unsupported URL scheme in {_quote(text)}")
    if not parts.hostname:
        raise HttpError(f"no host in {_quote(text)}")
    if port == 0:
        raise HttpError(f"port 0 in {_quote(text)}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Url(
        scheme=parts.scheme,
        host=parts.hostname,
        port=port if port is not None else (443 if parts.scheme == "https" else 80),
        target=target,
        text=urlunsplit(parts._replace(fragment="")),
    )


def follow_redirect(
    current: Url, status: int, location: str | None, visited: Sequence[str]
) -> Url:
    """Where a redirect from `current` leads (`visited`: every URL requested so far)."""
    if location is None:
        raise HttpError(f"HTTP {status} from {current.text} without a Location")
    if len(visited) > MAX_REDIRECTS:
        raise HttpError(f"more than {MAX_REDIRECTS} redirects from {visited[0]}")
    try:
        joined = urljoin(current.text, location)
    except ValueError as exc:
        raise HttpError(
            f"HTTP {status} with a malformed Location {_quote(location)}: {exc}"
        ) from None
    target = parse_url(joined)
    if current.scheme == "https" and target.scheme == "http":
        raise HttpError(f"redirect from {current.text} to {target.text} refused: https to http")
    if target.text in visited:
        raise HttpError(f"redirect loop: {current.text} redirects to {target.text} again")
    return target


def check_length(headers: Sequence[tuple[bytes, bytes]], cap: int) -> None:
    """TooLarge before the first body byte when Content-Length already says so."""
    for name, value in headers:
        # h11 has checked that a Content-Length is digits only, and that there is one.
        if name == b"content-length" and int(value) > cap:
            raise TooLarge(f"response body too large: Content-Length {int(value)} > {cap} bytes")


def header(headers: Sequence[tuple[bytes, bytes]], wanted: bytes) -> str | None:
    return next((v.decode("latin-1") for n, v in headers if n == wanted), None)


_BYTES_REPR = re.compile(r"bytearray\((b(['\"]).*?\2)\)")


def protocol_reason(exc: h11.ProtocolError) -> str:
    """A readable reason for what h11 refused in a response."""
    if exc.error_status_hint == 431:
        return f"response head or chunk-size line longer than {MAX_HEADER_BYTES} bytes"
    text = _BYTES_REPR.sub(r"\1", str(exc))
    if "ConnectionClosed" in text:
        return "connection closed before a complete response"
    return f"malformed response: {text[:MAX_QUOTE]}"


def request_for(url: Url, proxy: Proxy | None) -> h11.Request:
    """The GET for `url`; absolute-form when it goes through an http proxy unencrypted."""
    plain_proxy = proxy is not None and url.scheme == "http"
    headers = [
        ("Host", url.authority),
        ("User-Agent", USER_AGENT),
        ("Accept-Encoding", "identity"),
        ("Connection", "close"),
    ]
    if plain_proxy and proxy is not None and proxy.authorization:
        headers.append(("Proxy-Authorization", proxy.authorization))
    target = f"{url.scheme}://{url.authority}{url.target}" if plain_proxy else url.target
    return h11.Request(method="GET", target=target, headers=headers)


def connect_for(url: Url, proxy: Proxy) -> h11.Request:
    headers = [("Host", url.address), ("User-Agent", USER_AGENT)]
    if proxy.authorization:
        headers.append(("Proxy-Authorization", proxy.authorization))
    return h11.Request(method="CONNECT", target=url.address, headers=headers)


# -- I/O ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Deadline:
    when: float
    #: The Timeout's message.
    reason: str


class _Channel:
    """One connection: h11 fed from an asyncio stream, every wait under the request deadline."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        deadline: _Deadline,
        where: str,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.deadline = deadline
        self.where = where
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)

    async def wait(self, aw: Awaitable[T]) -> T:
        return await _within(aw, self.deadline, self.where)

    async def send(self, *events: h11.Event) -> None:
        try:
            data = b"".join(self.h11.send(e) or b"" for e in events)
        except h11.LocalProtocolError as exc:
            raise HttpError(f"{self.where}: cannot send the request: {exc}") from None
        await self.wait(self._write(data))

    async def _write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def parsed(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        """The next event from what has arrived, without waiting."""
        try:
            return self.h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise HttpError(f"{self.where}: {protocol_reason(exc)}") from None

    async def fill(self) -> None:
        # A read of data already buffered never suspends, so the timeout in `wait` would not
        # fire for a peer that always has more ready.
        if asyncio.get_running_loop().time() >= self.deadline.when:
            raise Timeout(self.deadline.reason)
        # b"" at EOF tells h11 the peer closed, which ends a close-delimited body.
        self.h11.receive_data(await self.wait(self.reader.read(READ_SIZE)))

    async def response(self) -> h11.Response:
        """The final response's head (interim 1xx ones skipped, up to a cap)."""
        interim = 0
        while True:
            event = self.parsed()
            if event is h11.NEED_DATA:
                await self.fill()
                continue
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):
                raise HttpError(f"{self.where}: no response ({event})")
            interim += 1
            if interim > MAX_INTERIM_RESPONSES:
                raise HttpError(f"{self.where}: more than {MAX_INTERIM_RESPONSES} interim "
                                "responses")

    async def body(self, sink: Sink, cap: int) -> int:
        """Stream the body into `sink`, one call per read at most; returns its size."""
        total = 0
        pending: list[bytes] = []
        while True:
            event = self.parsed()
            if isinstance(event, h11.Data):
                total += len(event.data)
                if total > cap:
                    raise TooLarge(f"response body too large: more than {cap} bytes")
                pending.append(bytes(event.data))
                continue
            if pending:
                await sink(b"".join(pending))
                pending.clear()
            if isinstance(event, h11.EndOfMessage):
                return total
            if event is not h11.NEED_DATA:
                raise HttpError(f"{self.where}: unexpected {event} in the body")
            await self.fill()


async def _within(aw: Awaitable[T], deadline: _Deadline, where: str) -> T:
    """Await socket work under the deadline; its failures become HttpError."""
    scope = asyncio.timeout_at(deadline.when)
    try:
        async with scope:
            return await aw
    except (OSError, ValueError, RuntimeError) as exc:
        # TimeoutError is an OSError: the deadline's, or the kernel's (connect ETIMEDOUT).
        if scope.expired():
            raise Timeout(deadline.reason) from None
        # ValueError: a host name the resolver refuses; RuntimeError: a transport that closed
        # under a write (uvloop).
        raise HttpError(f"{where}: {exc or type(exc).__name__}") from exc


async def _host_context() -> ssl.SSLContext:
    try:
        # Reading and parsing the host's CA bundle takes tens of milliseconds: not on the loop.
        return await asyncio.to_thread(host_ssl_context)
    except OSError as exc:  # ssl.SSLError included
        raise HttpError(f"cannot load the host's CA certificates: {exc}") from exc


@contextlib.asynccontextmanager
async def _connection(
    url: Url, proxies: ProxySettings, ssl_context: ssl.SSLContext | None, deadline: _Deadline
) -> AsyncIterator[tuple[_Channel, Proxy | None]]:
    """A channel ready for the GET of `url`, direct or through the environment's proxy."""
    try:
        proxy = proxies.proxy_for(url.scheme, url.host, url.port)
    except ProxyConfigError as exc:
        raise HttpError(str(exc)) from None
    tls = None
    if url.scheme == "https":
        tls = ssl_context or await _host_context()
    if proxy is None:
        where = url.address
        reader, writer = await _within(
            asyncio.open_connection(
                url.host, url.port, ssl=tls, server_hostname=url.host if tls else None
            ),
            deadline,
            f"cannot connect to {where}",
        )
    else:
        where = f"{url.address} through proxy {proxy.address}"
        reader, writer = await _within(
            asyncio.open_connection(proxy.host, proxy.port),
            deadline,
            f"cannot connect to proxy {proxy.address}",
        )
    try:
        channel = _Channel(reader, writer, deadline, where)
        if proxy is not None and tls is not None:
            await _tunnel(channel, url, proxy, tls)
            # The tunnelled request is a new HTTP conversation over the same socket.
            channel = _Channel(reader, writer, deadline, where)
        yield channel, proxy
    finally:
        # The body is complete or the request failed: nothing more to say to this peer, and a
        # graceful TLS close could wait on a hostile one.
        writer.transport.abort()


async def _tunnel(channel: _Channel, url: Url, proxy: Proxy, tls: ssl.SSLContext) -> None:
    await channel.send(connect_for(url, proxy), h11.EndOfMessage())
    response = await channel.response()
    if not 200 <= response.status_code < 300:
        raise HttpError(f"proxy {proxy.address} refused CONNECT {url.address}: "
                        f"HTTP {response.status_code}")
    early, _closed = channel.h11.trailing_data
    if early or channel.h11.their_state is not h11.SWITCHED_PROTOCOL:
        raise HttpError(f"proxy {proxy.address} sent data before the tunnel was up")
    await channel.wait(channel.writer.start_tls(tls, server_hostname=url.host))


async def get(
    url: str,
    sink: Sink,
    *,
    timeout: float,  # noqa: ASYNC109 - one deadline over connect, redirects and body
    max_bytes: int,
    ssl_context: ssl.SSLContext | None = None,
    proxies: ProxySettings | None = None,
) -> int:
    """GET `url`, following redirects, streaming the 200 body into `sink`; returns its size.

    Raises HttpError (TooLarge for the cap, Timeout for the deadline) on anything but a
    complete body; `proxies` defaults to this process's environment. The sink may have
    received part of a body before an error: callers discard it then.
    """
    loop = asyncio.get_running_loop()
    deadline = _Deadline(loop.time() + timeout, f"no complete answer from {url} within "
                                                f"{timeout:g} s")
    settings = proxies if proxies is not None else ProxySettings.from_env(os.environ)
    current = parse_url(url)
    visited = [current.text]
    while True:
        async with _connection(current, settings, ssl_context, deadline) as (channel, proxy):
            await channel.send(request_for(current, proxy), h11.EndOfMessage())
            response = await channel.response()
            status = response.status_code
            if status == 200:
                check_length(response.headers, max_bytes)
                return await channel.body(sink, max_bytes)
        if status not in REDIRECT_STATUSES:
            raise HttpError(f"HTTP {status} from {current.text}")
        current = follow_redirect(current, status, header(response.headers, b"location"),
                                  visited)
        visited.append(current.text)


async def fetch(
    url: str,
    *,
    timeout: float,  # noqa: ASYNC109 - passed on to get()
    max_bytes: int,
    ssl_context: ssl.SSLContext | None = None,
    proxies: ProxySettings | None = None,
) -> bytes:
    """GET a small body into memory (service discovery, metadata)."""
    parts: list[bytes] = []

    async def collect(data: bytes) -> None:
        parts.append(data)

    await get(url, collect, timeout=timeout, max_bytes=max_bytes, ssl_context=ssl_context,
              proxies=proxies)
    return b"".join(parts)
