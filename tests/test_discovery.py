"""Service discovery answers, the PROTOCOL order of candidates, and the reconnect backoff."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from elkeid_agent.config import RegionConfig
from elkeid_agent.transport.discovery import (
    SD_COUNT,
    SD_PATH,
    Backoff,
    Candidate,
    DiscoveryError,
    NetMode,
    candidates,
    fetch_sd_nodes,
    parse_sd_answer,
)
from elkeid_center.testing import CenterThread


def answer(msg: str = "ok", data: object = None) -> bytes:
    body: dict[str, object] = {"msg": msg}
    if data is not None:
        body["data"] = data
    return json.dumps(body).encode()


# --- parse_sd_answer --------------------------------------------------------------------------


def test_parse_ok_in_registry_order() -> None:
    body = answer(
        data=[
            {"ip": "10.0.0.2", "port": 6751, "weight": 10, "name": "hids_svr_grpc"},
            {"ip": "10.0.0.1", "port": 6752},
            {"ip": "fd00::5", "port": 6751, "weight": 1},
        ]
    )
    assert parse_sd_answer(body) == ["10.0.0.2:6751", "10.0.0.1:6752", "[fd00::5]:6751"]


def test_parse_ok_without_nodes() -> None:
    assert parse_sd_answer(answer(data=[])) == []
    assert parse_sd_answer(b'{"msg": "ok"}') == []


def test_parse_keeps_only_the_nodes_asked_for() -> None:
    # The request asks for 10 (count=10). An answer of thousands (256 KiB holds ~8,000) made
    # one connection round dial each before the private and public addresses, each dial up to
    # dial_timeout plus its diagnosis: days without a connection, and a state_detail line per
    # node in every heartbeat and status.json.
    nodes = [{"ip": f"10.0.{i // 250}.{i % 250 + 1}", "port": 6751} for i in range(500)]
    got = parse_sd_answer(answer(data=nodes))
    assert got == [f"10.0.0.{i + 1}:6751" for i in range(SD_COUNT)]


ERRORS = {
    "msg missing": (b'{"data": []}', "msg"),
    "msg not ok": (answer("not found", []), "not found"),
    "msg wrong type": (b'{"msg": 1, "data": []}', "msg"),
    "data not a list": (b'{"msg": "ok", "data": {"ip": "x"}}', "data"),
    "ip missing": (answer(data=[{"port": 1}]), "ip"),
    "port missing": (answer(data=[{"ip": "10.0.0.1"}]), "port"),
    "port a string": (answer(data=[{"ip": "10.0.0.1", "port": "6751"}]), "port"),
    "port 0": (answer(data=[{"ip": "10.0.0.1", "port": 0}]), "10.0.0.1"),
    "port too big": (answer(data=[{"ip": "10.0.0.1", "port": 65536}]), "65536"),
    "port negative": (answer(data=[{"ip": "10.0.0.1", "port": -1}]), "-1"),
    "empty ip": (answer(data=[{"ip": "", "port": 6751}]), "invalid"),
    "not JSON": (b"<html>502</html>", "not JSON"),
    "empty body": (b"", "not JSON"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_parse_errors_name_the_problem(case: str) -> None:
    body, needle = ERRORS[case]
    with pytest.raises(DiscoveryError) as info:
        parse_sd_answer(body)
    assert needle in str(info.value)


@given(st.binary(max_size=200))
def test_parse_random_bytes_only_discovery_errors(body: bytes) -> None:
    with contextlib.suppress(DiscoveryError):
        parse_sd_answer(body)


# --- candidates -------------------------------------------------------------------------------


def test_candidates_order_sd_private_public() -> None:
    region = RegionConfig(service_discovery="sd:8088", private="10.0.0.1:6751", public="p:6751")
    assert candidates(region, ["a:1", "b:2"]) == [
        Candidate("a:1", NetMode.SD),
        Candidate("b:2", NetMode.SD),
        Candidate("10.0.0.1:6751", NetMode.PRIVATE),
        Candidate("p:6751", NetMode.PUBLIC),
    ]


def test_candidates_skip_what_is_not_configured() -> None:
    assert candidates(RegionConfig(public="p:1"), []) == [Candidate("p:1", NetMode.PUBLIC)]
    assert candidates(RegionConfig(private="q:1"), ["s:1"]) == [
        Candidate("s:1", NetMode.SD),
        Candidate("q:1", NetMode.PRIVATE),
    ]
    assert candidates(RegionConfig(), []) == []


def test_net_mode_strings() -> None:
    assert [str(m) for m in NetMode] == ["unknown", "sd", "private", "public"]


# --- Backoff ----------------------------------------------------------------------------------


def test_backoff_without_jitter_grows_to_cap() -> None:
    backoff = Backoff(jitter=0.0)
    delays = [backoff.next() for _ in range(14)]
    expected = [min(1.0 * 1.6**i, 120.0) for i in range(14)]
    assert delays == pytest.approx(expected)
    assert delays[-1] == 120.0
    assert delays[10] == pytest.approx(109.95116)  # 1.6**10; 1.6**11 is over the cap
    assert delays[11] == 120.0


def test_backoff_reset_starts_over() -> None:
    backoff = Backoff(jitter=0.0)
    for _ in range(6):
        backoff.next()
    backoff.reset()
    assert backoff.next() == 1.0
    assert backoff.next() == pytest.approx(1.6)


@given(seed=st.integers(0, 2**32), jitter=st.sampled_from([0.1, 0.2, 0.5]))
def test_backoff_jitter_bounds(seed: int, jitter: float) -> None:
    backoff = Backoff(jitter=jitter, rng=random.Random(seed))
    for i in range(20):
        base = min(1.6**i, 120.0)
        delay = backoff.next()
        assert base * (1 - jitter) <= delay <= base * (1 + jitter)


def test_backoff_jitter_spreads() -> None:
    delays = {round(Backoff(rng=random.Random(seed)).next(), 6) for seed in range(50)}
    assert len(delays) > 40
    assert min(delays) < 0.9
    assert max(delays) > 1.1


# --- fetch_sd_nodes over real sockets on 127.0.0.1 --------------------------------------------

Handler = Callable[[bytes], bytes]


async def with_server(
    respond: Handler, client: Callable[[str], Awaitable[Any]]
) -> tuple[Any, list[bytes]]:
    """Run `client(host:port)` against a one-shot HTTP server answering `respond(request)`."""
    requests: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        requests.append(request)
        writer.write(respond(request))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(10):
            return await client(f"127.0.0.1:{port}"), requests
    finally:
        server.close()
        await server.wait_closed()


def http(body: bytes, status: str = "200 OK") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def test_fetch_sd_nodes_ok() -> None:
    body = answer(data=[{"ip": "10.1.1.1", "port": 6751}, {"ip": "10.1.1.2", "port": 6752}])
    nodes, requests = asyncio.run(with_server(lambda _: http(body), fetch_sd_nodes))
    assert nodes == ["10.1.1.1:6751", "10.1.1.2:6752"]
    assert len(requests) == 1
    assert requests[0].startswith(f"GET {SD_PATH} HTTP/1.".encode())


@pytest.mark.parametrize(
    ("response", "needle"),
    [
        (http(b"oops", "500 Internal Server Error"), "500"),
        (http(answer("busy", [])), "busy"),
        (http(b"{not json"), "not JSON"),
        (b"garbage\r\n\r\n", "garbage"),
        (http(answer(data=[{"ip": "x" * 300_000, "port": 1}])), "too large"),
    ],
)
def test_fetch_sd_nodes_errors(response: bytes, needle: str) -> None:
    async def client(host: str) -> str:
        with pytest.raises(DiscoveryError) as info:
            await fetch_sd_nodes(host)
        return str(info.value)

    message, _ = asyncio.run(with_server(lambda _: response, client))
    assert needle in message


def test_fetch_sd_nodes_refused() -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with pytest.raises(DiscoveryError, match=f"127.0.0.1:{port}"):
            await fetch_sd_nodes(f"127.0.0.1:{port}")
        with pytest.raises(DiscoveryError):
            await fetch_sd_nodes("127.0.0.1:notaport")

    asyncio.run(main())


def test_fetch_sd_nodes_from_the_local_center() -> None:
    with CenterThread() as center:
        nodes = asyncio.run(fetch_sd_nodes(center.sd_address))
        assert nodes == [center.address]
        center.set_sd_backends([("10.9.9.9", 7000, 5), ("127.0.0.1", center.port)])
        nodes = asyncio.run(fetch_sd_nodes(center.sd_address))
        assert nodes == ["10.9.9.9:7000", center.address]
        center.set_sd_status(503)
        with pytest.raises(DiscoveryError, match="503"):
            asyncio.run(fetch_sd_nodes(center.sd_address))
        assert len(center.sd_requests()) == 3


def test_service_discovery_through_a_proxy_with_odd_credentials_fails_as_discovery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The bytes of a non-UTF-8 environment variable must not raise out of http.get: that
    # ended the transfer loop (it expects DiscoveryError or a timeout), and so the agent.
    monkeypatch.setenv("HTTP_PROXY", "http://us\udce9r:pw@127.0.0.1:9")
    with pytest.raises(DiscoveryError, match="proxy"):
        asyncio.run(fetch_sd_nodes("192.0.2.1:9", timeout=5))
