"""Issue 18: a newer Config set supersedes the one being applied. The decision (which installs
go on, which are cancelled) is `plan_sync`, pure; the supervisor carries it out against a
real HTTP server on 127.0.0.1 that drips."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from plugtools import Harness, run, sh_plugin, sha, until

from elkeid_agent.commands import ConfigSpec
from elkeid_agent.config import PluginsConfig
from elkeid_agent.plugins.lifecycle import State
from elkeid_agent.plugins.supervisor import plan_sync

A1 = ConfigSpec(name="a", version="1", sha256="01" * 32, download_urls=("http://h/a1",))
A2 = ConfigSpec(name="a", version="2", sha256="02" * 32, download_urls=("http://h/a2",))
B1 = ConfigSpec(name="b", version="1", sha256="03" * 32, download_urls=("http://h/b1",))
C1 = ConfigSpec(name="c", version="1", sha256="04" * 32, download_urls=("http://h/c1",))


def test_an_unchanged_install_goes_on_and_is_not_started_again() -> None:
    plan = plan_sync({}, ["a", "b"], [A1, B1], installing={"a": A1, "b": B1})
    assert plan.going_on == ("a", "b")
    assert plan.cancel == ()
    assert plan.start == ()
    assert plan.remove == ()


def test_a_changed_removed_or_refused_install_is_cancelled() -> None:
    moved = ConfigSpec(name="b", version="1", sha256="03" * 32, download_urls=("http://m/b1",))
    plan = plan_sync(
        {}, ["a", "b", "c"], [A2, moved], hold=["c"],
        installing={"a": A1, "b": B1, "c": C1},
    )
    # a: another version; b: the same version from another URL (any field counts); c: its
    # entry was refused this time (held): none of them goes on.
    assert plan.cancel == ("a", "b", "c")
    assert plan.going_on == ()
    assert plan.start == (A2, moved)
    assert plan.remove == ()  # c is held: its directory stays


def test_a_removed_entry_is_cancelled_and_its_directory_removed() -> None:
    plan = plan_sync({}, ["a", "b"], [B1], installing={"a": A1, "b": B1})
    assert plan.cancel == ("a",)
    assert plan.remove == ("a",)
    assert plan.going_on == ("b",)
    assert plan.start == ()


def test_back_to_the_running_version_cancels_and_keeps() -> None:
    # a 1 runs; a 2 is being installed; the newest set asks for a 1 again.
    plan = plan_sync({"a": "1"}, ["a"], [A1], installing={"a": A2})
    assert plan.cancel == ("a",)
    assert plan.keep == ("a",)
    assert plan.start == ()


GOOD = sh_plugin("exec cat <&3 >/dev/null")


@dataclass
class Route:
    body: bytes
    interval: float = 0.0  # seconds between bytes; 0: all at once
    hits: int = 0
    sent: int = 0
    hung_up: bool = False  # the client closed before the end


@dataclass
class Drips:
    """An HTTP server whose paths send their body at a chosen pace."""

    routes: dict[str, Route] = field(default_factory=dict)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        route = self.routes[head.split(b" ")[1].decode()]
        route.hits += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(route.body))
        try:
            if not route.interval:
                writer.write(route.body)
                route.sent = len(route.body)
            for i in range(len(route.body) if route.interval else 0):
                # EOF from the client between bytes: it hung up.
                try:
                    async with asyncio.timeout(route.interval):
                        if not await reader.read(1):
                            route.hung_up = True
                            return
                except TimeoutError:
                    pass
                writer.write(route.body[i : i + 1])
                await writer.drain()
                route.sent += 1
        except (ConnectionError, OSError):
            route.hung_up = True
        finally:
            writer.close()


def _spec(drips: Drips, name: str, path: str) -> ConfigSpec:
    return ConfigSpec(name=name, version="1", sha256=sha(GOOD),
                      download_urls=(drips.url(path),))


def test_a_newer_set_supersedes_a_dripping_one(tmp_path: Path) -> None:
    async def main() -> None:
        drips = Drips({
            "/slow": Route(b"x" * 1000, interval=1.0),  # the host: a byte a second
            "/steady": Route(GOOD, interval=0.05),  # above the minimum, done in ~2 s
            "/fresh": Route(GOOD),
        })
        server = await asyncio.start_server(drips.handle, "127.0.0.1", 0)
        drips.port = server.sockets[0].getsockname()[1]
        config = PluginsConfig(download_min_bytes=16, download_min_seconds=4.0)
        async with server, Harness(tmp_path, config) as h:
            sup = h.sup
            slow, steady = _spec(drips, "slow", "/slow"), _spec(drips, "steady", "/steady")
            first = asyncio.create_task(sup.sync([slow, steady]))
            # While it waits, the entry is named with its slow URL (a quarter window in).
            await until(lambda: any("plugin slow" in e for e in sup.errors()), 5,
                        "the waiting entry named")
            waiting = next(e for e in sup.errors() if "plugin slow" in e)
            assert drips.url("/slow") in waiting
            assert not first.done()
            assert drips.routes["/steady"].sent < len(GOOD)

            started = time.monotonic()
            second = asyncio.create_task(sup.sync([steady, _spec(drips, "fresh", "/fresh")]))
            await asyncio.wait_for(first, 1)  # superseded: it stops waiting at once
            await asyncio.wait_for(second, 5)
            took = time.monotonic() - started
            assert took < 5
            await until(lambda: drips.routes["/slow"].hung_up, 2, "the slow URL hung up on")
            for name in ("steady", "fresh"):
                info = sup.slot_info(name)
                assert info is not None
                assert info[0] in (State.STARTING, State.RUNNING)
            assert sup.slot_info("slow") is None
            assert not (tmp_path / "plugin" / "slow").exists()
            # The unchanged entry's download went on: requested once, completed.
            assert drips.routes["/steady"].hits == 1
            assert drips.routes["/steady"].sent == len(GOOD)
            assert sup.errors() == []
            assert sup.health.counters["downloads_abandoned"] == 0

    run(main())


def test_a_sync_that_is_not_superseded_waits_for_its_installs(tmp_path: Path) -> None:
    async def main() -> None:
        drips = Drips({"/steady": Route(GOOD, interval=0.02)})
        server = await asyncio.start_server(drips.handle, "127.0.0.1", 0)
        drips.port = server.sockets[0].getsockname()[1]
        async with server, Harness(tmp_path) as h:
            await h.sup.sync([_spec(drips, "steady", "/steady")])
            assert drips.routes["/steady"].sent == len(GOOD)
            assert h.sup.slot_info("steady") is not None
            assert h.sup.errors() == []

    run(main())
