"""http.py against hostile and broken servers and proxies, all real sockets on 127.0.0.1.

Every failure a server can provoke must surface as HttpError with a reason, in bounded time
and memory; nothing else may escape (issue 9).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elkeid_agent import http
from elkeid_agent.proxyenv import ProxySettings
from elkeid_center.certs import generate_certs, generate_server_cert

T = TypeVar("T")
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
#: No proxy whatever the test machine's environment says.
DIRECT = ProxySettings()


def run(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


@contextlib.asynccontextmanager
async def serve(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """A server on 127.0.0.1 running `handler` per connection; yields its port."""

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The client hanging up on a hostile server is the expected end of most handlers.
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            await handler(reader, writer)
        writer.close()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0, ssl=tls)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def answering(response: bytes, then: Handler | None = None) -> Handler:
    """A handler that reads the request head, writes `response`, then runs `then`."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()
        if then is not None:
            await then(reader, writer)

    return handler


def endless(block: bytes) -> Handler:
    async def handler(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            writer.write(block)
            await writer.drain()

    return handler


async def stall(_reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(60)


async def fetch(url: str, **kw: Any) -> bytes:
    kw.setdefault("timeout", 10)
    kw.setdefault("max_bytes", 1 << 20)
    kw.setdefault("proxies", DIRECT)
    return await http.fetch(url, **kw)


def refused(response: bytes | Handler, match: str, **kw: Any) -> http.HttpError:
    """Serve `response` once and return the HttpError the client raised."""
    handler = answering(response) if isinstance(response, bytes) else response

    async def main() -> http.HttpError:
        async with serve(handler) as port:
            with pytest.raises(http.HttpError, match=match) as info:
                await fetch(f"http://127.0.0.1:{port}/x", **kw)
            return info.value

    return run(main())


# -- framing and limits ----------------------------------------------------------------------


def test_a_200_kb_chunk_size_line_is_refused() -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    refused(head + b"1" * 200_000 + b"\r\n", "chunk-size line longer than 65536 bytes")


def test_a_huge_chunk_size_value_hits_the_body_cap() -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffff\r\n"
    error = refused(answering(head, endless(b"z" * 65536)), "too large", max_bytes=100_000)
    assert isinstance(error, http.TooLarge)


@pytest.mark.parametrize("value", ["-1", "abc", "1e3", "0x10", "1, 2", " "])
def test_a_bad_content_length_is_refused(value: str) -> None:
    response = f"HTTP/1.1 200 OK\r\nContent-Length: {value}\r\n\r\nbody".encode()
    error = refused(response, "malformed response")
    assert "Content-Length" in str(error)


def test_content_length_over_the_cap_is_refused_before_the_body() -> None:
    # The server would send nothing more: only the header can have decided.
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n"
    started = time.monotonic()
    error = refused(answering(head, stall), r"Content-Length 999999999 > 1000 bytes",
                    max_bytes=1000)
    assert isinstance(error, http.TooLarge)
    assert time.monotonic() - started < 5


def test_a_body_without_length_stops_at_the_cap() -> None:
    head = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
    started = time.monotonic()
    error = refused(answering(head, endless(b"x" * 65536)), "more than 1048576 bytes")
    assert isinstance(error, http.TooLarge)
    assert time.monotonic() - started < 5


def test_a_close_delimited_body_within_the_cap_is_complete() -> None:
    body = bytes(range(256)) * 1000

    async def main() -> bytes:
        handler = answering(b"HTTP/1.1 200 OK\r\n\r\n" + body)
        async with serve(handler) as port:
            return await fetch(f"http://127.0.0.1:{port}/x")

    assert run(main()) == body


def test_endless_headers_are_refused() -> None:
    head = b"HTTP/1.1 200 OK\r\n"
    refused(answering(head, endless(b"X-Filler: " + b"a" * 100 + b"\r\n")),
            "response head or chunk-size line longer than 65536 bytes")


def test_endless_interim_responses_are_refused() -> None:
    refused(answering(b"", endless(b"HTTP/1.1 100 Continue\r\n\r\n")), "interim responses")


def test_a_truncated_body_is_refused() -> None:
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this"
    refused(response, "malformed response.*peer closed connection")


def test_a_closed_connection_reads_as_such() -> None:
    async def hang_up(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")

    refused(hang_up, "connection closed before a complete response")


def test_garbage_is_quoted_readably() -> None:
    error = refused(b"garbage\x00\r\n\r\n", "illegal status line")
    assert "bytearray" not in str(error)


def test_a_server_stalling_mid_body_meets_the_deadline() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nhalf"
    started = time.monotonic()
    error = refused(answering(head, stall), r"within 0\.5 s", timeout=0.5)
    assert isinstance(error, http.Timeout)
    assert time.monotonic() - started < 3


def test_a_trickling_server_meets_the_deadline() -> None:
    """One byte every 50 ms keeps every read short; the request's deadline still holds."""

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n")
        while True:
            writer.write(b"X")
            await writer.drain()
            await asyncio.sleep(0.05)

    started = time.monotonic()
    error = refused(trickle, r"within 1 s", timeout=1)
    assert isinstance(error, http.Timeout)
    assert time.monotonic() - started < 4


def test_a_fast_endless_body_meets_the_deadline() -> None:
    """A peer that always has data ready never lets a read wait: the deadline still holds."""

    async def main() -> None:
        async def slow_sink(_data: bytes) -> None:
            await asyncio.sleep(0.01)

        head = b"HTTP/1.1 200 OK\r\n\r\n"
        async with serve(answering(head, endless(b"x" * 65536))) as port:
            started = time.monotonic()
            with pytest.raises(http.Timeout):
                await http.get(f"http://127.0.0.1:{port}/", slow_sink, timeout=1,
                               max_bytes=1 << 40, proxies=DIRECT)
            assert time.monotonic() - started < 4

    run(main())


def test_a_refused_connection_names_the_address() -> None:
    async def main() -> None:
        async with serve(stall) as port:
            pass
        with pytest.raises(http.HttpError, match=f"cannot connect to 127.0.0.1:{port}"):
            await fetch(f"http://127.0.0.1:{port}/x")

    run(main())


# -- URLs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("http://127.0.0.1:99999/p", "malformed URL"),
        ("http://127.0.0.1:port/p", "malformed URL"),
        ("http://[::1/p", "malformed URL"),
        ("http://127.0.0.1/a\x00b", "control"),
        ("http://127.0.0.1\x00.example/p", "control"),
        ("http://127.0.0.1/a b", "control"),
        ("http://127.0.0.1/\r\nX-Injected: 1", "control"),
        ("http://dównload.example/p", "non-ASCII"),
        ("ftp://127.0.0.1/p", "scheme"),
        ("http:///p", "no host"),
        ("http://127.0.0.1:0/p", "port 0"),
        ("", "scheme"),
        # The resolver's IDNA encoding refuses these before any lookup (a ValueError).
        ("http://a..b/p", "cannot connect to a..b:80"),
        ("http://" + "a" * 64 + ".example/p", "cannot connect"),
    ],
)
def test_bad_urls_are_http_errors(url: str, match: str) -> None:
    with pytest.raises(http.HttpError, match=match):
        run(fetch(url))


def test_url_parts() -> None:
    url = http.parse_url("HTTP://Example.COM/a/b?q=1#frag")
    assert (url.scheme, url.host, url.port, url.target) == ("http", "example.com", 80, "/a/b?q=1")
    assert url.authority == "example.com"
    assert url.text == "http://Example.COM/a/b?q=1"
    v6 = http.parse_url("https://[fd00::1]:8443")
    assert (v6.host, v6.port, v6.target, v6.authority) == ("fd00::1", 8443, "/", "[fd00::1]:8443")
    assert http.parse_url("https://[fd00::1]/").authority == "[fd00::1]"


# -- redirects ---------------------------------------------------------------------------------


def redirecting(routes: dict[str, str], body: bytes = b"done") -> Handler:
    """Paths in `routes` answer 302 to their target; any other path answers `body`."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ", 2)[1].decode()
        if path in routes:
            writer.write(f"HTTP/1.1 302 Found\r\nLocation: {routes[path]}\r\n"
                         "Content-Length: 0\r\n\r\n".encode())
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()

    return handler


def test_three_redirects_are_followed_and_a_fourth_is_not() -> None:
    async def main() -> None:
        routes = {"/1": "/2", "/2": "/3", "/3": "/4", "/4": "/5"}
        async with serve(redirecting(routes)) as port:
            assert await fetch(f"http://127.0.0.1:{port}/2") == b"done"
            with pytest.raises(http.HttpError, match="more than 3 redirects"):
                await fetch(f"http://127.0.0.1:{port}/1")

    run(main())


def test_a_redirect_loop_is_refused() -> None:
    async def main() -> None:
        async with serve(redirecting({"/a": "/b", "/b": "/a"})) as port:
            with pytest.raises(http.HttpError, match="redirect loop"):
                await fetch(f"http://127.0.0.1:{port}/a")
        async with serve(redirecting({"/self": "/self#again"})) as port:
            with pytest.raises(http.HttpError, match="redirect loop"):
                await fetch(f"http://127.0.0.1:{port}/self")

    run(main())


def test_a_redirect_without_location_or_to_a_bad_url_is_refused() -> None:
    refused(b"HTTP/1.1 301 Moved\r\nContent-Length: 0\r\n\r\n", "without a Location")
    refused(b"HTTP/1.1 307 Moved\r\nLocation: http://[::1/x\r\nContent-Length: 0\r\n\r\n",
            "malformed")
    refused(b"HTTP/1.1 308 Moved\r\nLocation: gopher://x/\r\nContent-Length: 0\r\n\r\n",
            "scheme")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ssl.SSLContext]:
    """A CA, and a server context for `localhost` and `download.example` signed by it."""
    directory = tmp_path_factory.mktemp("pki")
    certs = generate_certs(directory / "ca")
    cert, key = generate_server_cert(certs, directory / "srv",
                                     names=("localhost", "download.example"))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return certs.ca, server


def test_https_to_http_redirect_is_refused(pki: tuple[Path, ssl.SSLContext]) -> None:
    ca, server_tls = pki

    async def main() -> None:
        plain_hits: list[bytes] = []

        async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            plain_hits.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno")

        ctx = http.host_ssl_context(str(ca))
        async with serve(plain) as plain_port:
            routes = {"/down": f"http://127.0.0.1:{plain_port}/x", "/same": "/ok"}
            async with serve(redirecting(routes, b"secure"), server_tls) as port:
                base = f"https://localhost:{port}"
                assert await fetch(f"{base}/same", ssl_context=ctx) == b"secure"
                with pytest.raises(http.HttpError, match="https to http"):
                    await fetch(f"{base}/down", ssl_context=ctx)
        assert plain_hits == []

    run(main())


# -- proxies -----------------------------------------------------------------------------------


class Proxy:
    """A loopback proxy recording each request head: absolute-form GETs it answers itself,
    CONNECT tunnels it splices to `tunnel_port` on 127.0.0.1 (whatever host was asked)."""

    def __init__(self, tunnel_port: int = 0, connect_status: int = 200) -> None:
        self.heads: list[str] = []
        self.tunnel_port = tunnel_port
        self.connect_status = connect_status

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        self.heads.append(head)
        if not head.startswith("CONNECT "):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nvia proxy")
            await writer.drain()
            return
        if self.connect_status != 200:
            writer.write(f"HTTP/1.1 {self.connect_status} No\r\nContent-Length: 0\r\n\r\n"
                         .encode())
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.tunnel_port)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(pump(reader, up_writer))
            tg.create_task(pump(up_reader, writer))


def header_of(head: str, name: str) -> str | None:
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.lower() == name.lower():
            return value.strip()
    return None


def test_http_goes_through_the_proxy_in_absolute_form() -> None:
    async def main() -> None:
        proxy = Proxy()
        async with serve(proxy) as pport:
            env = {"http_proxy": f"http://agent:p%40ss@127.0.0.1:{pport}"}
            body = await fetch("http://download.example/plugin?v=1",
                               proxies=ProxySettings.from_env(env))
        assert body == b"via proxy"
        [head] = proxy.heads
        assert head.startswith("GET http://download.example/plugin?v=1 HTTP/1.1\r\n")
        assert header_of(head, "Host") == "download.example"
        credentials = base64.b64encode(b"agent:p@ss").decode()
        assert header_of(head, "Proxy-Authorization") == f"Basic {credentials}"

    run(main())


def test_no_proxy_and_loopback_go_direct() -> None:
    """0.0.0.0 reaches the local server without being a loopback address: Go proxies it
    unless NO_PROXY says otherwise, while 127.0.0.1 and localhost are never proxied."""

    async def main() -> None:
        proxy = Proxy()
        origin = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\ndirect")
        async with serve(proxy) as pport, serve(origin) as oport:
            proxied = ProxySettings.from_env({"HTTP_PROXY": f"127.0.0.1:{pport}"})
            bypass = ProxySettings.from_env(
                {"HTTP_PROXY": f"127.0.0.1:{pport}", "NO_PROXY": "example.com, 0.0.0.0"}
            )
            assert await fetch(f"http://0.0.0.0:{oport}/a", proxies=proxied) == b"via proxy"
            assert await fetch(f"http://0.0.0.0:{oport}/b", proxies=bypass) == b"direct"
            assert await fetch(f"http://127.0.0.1:{oport}/c", proxies=proxied) == b"direct"
            assert await fetch(f"http://localhost:{oport}/d", proxies=proxied) == b"direct"
        assert [h.split("\r\n")[0] for h in proxy.heads] == [
            f"GET http://0.0.0.0:{oport}/a HTTP/1.1"
        ]

    run(main())


def test_https_goes_through_a_connect_tunnel(pki: tuple[Path, ssl.SSLContext]) -> None:
    ca, server_tls = pki

    async def main() -> None:
        origin = redirecting({}, b"tunnelled and verified")
        async with serve(origin, server_tls) as oport:
            proxy = Proxy(tunnel_port=oport)
            async with serve(proxy) as pport:
                env = {"HTTPS_PROXY": f"http://u:pw@127.0.0.1:{pport}",
                       "HTTP_PROXY": "http://127.0.0.1:1"}
                body = await fetch("https://download.example/f",
                                   ssl_context=http.host_ssl_context(str(ca)),
                                   proxies=ProxySettings.from_env(env))
        assert body == b"tunnelled and verified"
        [head] = proxy.heads
        assert head.startswith("CONNECT download.example:443 HTTP/1.1\r\n")
        assert header_of(head, "Proxy-Authorization") == "Basic " + base64.b64encode(
            b"u:pw").decode()

    run(main())


def test_a_tunnel_to_the_wrong_name_fails_verification(pki: tuple[Path, ssl.SSLContext]) -> None:
    ca, server_tls = pki

    async def main() -> None:
        async with serve(redirecting({}), server_tls) as oport, serve(
            Proxy(tunnel_port=oport)
        ) as pport:
            env = {"HTTPS_PROXY": f"127.0.0.1:{pport}"}
            with pytest.raises(http.HttpError, match="CERTIFICATE_VERIFY_FAILED"):
                await fetch("https://other.example/f",
                            ssl_context=http.host_ssl_context(str(ca)),
                            proxies=ProxySettings.from_env(env))

    run(main())


def test_a_refused_connect_and_bad_proxies_are_http_errors() -> None:
    async def main() -> None:
        async with serve(Proxy(connect_status=407)) as pport:
            env = {"HTTPS_PROXY": f"127.0.0.1:{pport}"}
            with pytest.raises(http.HttpError, match=r"refused CONNECT download\.example:443"):
                await fetch("https://download.example/f", proxies=ProxySettings.from_env(env))
        for value, match in [
            ("socks5://127.0.0.1:1080", "socks5 proxies are not supported"),
            ("https://proxy.example", "https proxies are not supported"),
            ("http://proxy.example:99999", "not a valid proxy URL"),
            ("http://[::1", "not a valid proxy URL"),
        ]:
            with pytest.raises(http.HttpError, match=match):
                await fetch("http://download.example/",
                            proxies=ProxySettings.from_env({"HTTP_PROXY": value}))

    run(main())


# -- anything at all ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=400),
        st.builds(lambda tail: b"HTTP/1.1 200 OK\r\n" + tail, st.binary(max_size=400)),
        st.builds(
            lambda headers, body: b"HTTP/1.1 200 OK\r\n" + headers + b"\r\n\r\n" + body,
            st.sampled_from([b"Transfer-Encoding: chunked", b"Content-Length: 5",
                             b"Transfer-Encoding: gzip, chunked", b"Content-Length: 99"]),
            st.binary(max_size=200),
        ),
    )
)
def test_any_response_is_a_body_or_an_http_error(response: bytes) -> None:
    async def main() -> None:
        async with serve(answering(response)) as port:
            with contextlib.suppress(http.HttpError):
                await fetch(f"http://127.0.0.1:{port}/", timeout=3, max_bytes=1000)

    run(main())
