"""Issue 18, the time budget of Config sets: a download host that drips a byte a second holds
neither the set nor the next one.

The agent's minimum progress is configured small (16 bytes in 4 s) so the cases run in
seconds; the drips send 1 byte a second, as the issue's host did. Every case ends with
`rig.survived()`: the same agent PID is alive and a new 1000 arrives.
"""

from __future__ import annotations

import itertools
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentproc import patch_config
from faultrig import BASE, BASE_EXE, MIB, Rig, RssSampler, case, sh_plugin, sha
from hostile import Behaviour, Hostile, Progress, body

GOOD_EXE = sh_plugin("exec cat <&3 >/dev/null")
MIN_BYTES = 16
MIN_SECONDS = 4.0
RSS_LIMIT = 100 * MIB
#: The longest silence between two heartbeats (sent every 0.5 s) a loaded test host may show.
MAX_BEAT_GAP = 3.0


def drip(data: bytes, progress: Progress, interval: float = 1.0) -> Behaviour:
    """A 200 whose body comes one byte per `interval`; `progress.broken` once the agent hung
    up first (seen at once: the socket is watched between bytes)."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(data)

    def behave(conn: socket.socket, server: Hostile) -> None:
        try:
            conn.sendall(head)
            for i in range(len(data)):
                readable, _, _ = select.select([conn], [], [], interval)
                if server.released.is_set():
                    return
                if readable and not conn.recv(1):
                    progress.broken = True
                    return
                conn.sendall(data[i : i + 1])
                progress.sent += 1
        except OSError:
            progress.broken = True
        finally:
            progress.done.set()

    return behave


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = Rig(tmp_path_factory.mktemp("fault-configsets"))
    patch_config(
        rig.config,
        plugins={"download_min_bytes": MIN_BYTES, "download_min_seconds": MIN_SECONDS},
    )
    with rig:
        yield rig


@pytest.fixture
def rig(shared: Rig) -> Iterator[Rig]:
    yield from case(shared)


def _entry(name: str, urls: list[str], exe: bytes = GOOD_EXE) -> dict[str, object]:
    return {"name": name, "version": "1", "sha256": sha(exe), "download_urls": urls}


def _no_partial_files(directory: Path) -> None:
    assert not list(directory.glob(".download-*")) + list(directory.glob(".staging-*"))


def _beats_on_time(rig: Rig, since: float) -> None:
    stamps = [b.recv_time for b in rig.beats(since)]
    assert len(stamps) >= 2
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert max(gaps) < MAX_BEAT_GAP, f"heartbeats {max(gaps):.1f} s apart"


def _logged(rig: Rig, since: float, *needles: str) -> None:
    """A 1010 (an error line of the agent's log) naming all of `needles`."""
    rig.wait(
        lambda: [r for r in rig.center.records(1010)
                 if r.recv_time > since and all(n in r.fields.get("msg", "") for n in needles)],
        5,
        f"a 1010 naming {needles}",
    )


def test_a_newer_set_takes_effect_while_a_download_of_the_older_drips(rig: Rig) -> None:
    # 16 URLs, each dripping a byte a second (the host): under the old code the set,
    # and every set after it, waited up to 16 x 600 s.
    drips = [Progress() for _ in range(16)]
    for i, progress in enumerate(drips):
        rig.hostile.routes[f"/slow{i}"] = drip(b"x" * 1000, progress)
    # An entry the newer set leaves unchanged, in flight when it comes: 6-7 bytes a second,
    # above the minimum (16 in 2.4 s of each 4 s window), done in about 5 s.
    steady = Progress()
    rig.hostile.routes["/steady"] = drip(GOOD_EXE, steady, interval=0.15)
    since = time.time()
    with RssSampler(rig.pid) as rss:
        rig.center.send_configs([
            rig.publish(BASE, BASE_EXE),
            _entry("slow", [rig.hostile.url(f"/slow{i}") for i in range(16)]),
            _entry("steady", [rig.hostile.url("/steady")]),
        ])
        # While it waits, state_detail names the entry and the slow URL.
        detail = rig.detail_after(since, "plugin slow", timeout=10)
        assert rig.hostile.url("/slow0") in detail["state_detail"]
        assert detail["state"] == "abnormal"
        assert not steady.done.is_set(), "the steady download ended before the newer set came"

        pushed = time.time()
        rig.center.send_configs([
            rig.publish(BASE, BASE_EXE),
            _entry("steady", [rig.hostile.url("/steady")]),
            rig.publish("fresh", GOOD_EXE),
        ])
        rig.plugin_beat_after(pushed, "fresh", timeout=5)
        assert time.time() - pushed < 5
        # The removed entry's download was cancelled (the agent hung up), its directory gone.
        rig.wait(lambda: drips[0].broken, 5, "the agent hanging up on the removed entry's URL")
        rig.wait(lambda: "slow" not in rig.plugin_dirs(), 5, "plugin/slow removed")
        # The unchanged entry's download went on: one request, completed, and the plugin runs.
        rig.plugin_beat_after(pushed, "steady", timeout=10)
        assert rig.hostile.paths().count(b"/steady") == 1
        assert steady.sent == len(GOOD_EXE)
        assert not steady.broken
        assert rig.hostile.paths().count(b"/slow1") == 0
        _no_partial_files(rig.plugin_root / "steady")
        # Back to `running` with no detail once the newer set is in effect.
        rig.wait(
            lambda: (b := rig.beats(time.time() - 0.6)) and b[-1].fields["state"] == "running",
            10,
            "a heartbeat saying running",
        )
    assert rss.peak < RSS_LIMIT, f"agent RSS peaked at {rss.peak / MIB:.1f} MiB"
    _beats_on_time(rig, since)
    rig.survived()


def test_a_dripping_url_is_abandoned_for_the_next(rig: Rig) -> None:
    dripping = Progress()
    rig.hostile.routes["/mirror-slow"] = drip(b"x" * 1000, dripping)
    rig.hostile.routes["/mirror-good"] = body(GOOD_EXE)
    before = rig.beat_after(time.time())
    abandoned = int(before.get("downloads_abandoned", "0"))
    since = time.time()
    with RssSampler(rig.pid) as rss:
        rig.center.send_configs([
            rig.publish(BASE, BASE_EXE),
            _entry("mirror", [rig.hostile.url("/mirror-slow"), rig.hostile.url("/mirror-good")]),
        ])
        detail = rig.detail_after(since, "plugin mirror", timeout=10)["state_detail"]
        assert rig.hostile.url("/mirror-slow") in detail
        # Abandoned at the end of its first window (4 s, plus a heartbeat's slack), not 600 s.
        rig.plugin_beat_after(since, "mirror", timeout=MIN_SECONDS + 6)
    assert dripping.broken
    assert dripping.sent < MIN_BYTES
    assert rig.hostile.paths().count(b"/mirror-good") == 1
    beat = rig.beat_after(time.time())
    assert int(beat["downloads_abandoned"]) == abandoned + 1
    # Named: the abandonment's log line reached the server, with the entry and the URL.
    _logged(rig, since, "mirror", "download abandoned", rig.hostile.url("/mirror-slow"))
    assert rss.peak < RSS_LIMIT, f"agent RSS peaked at {rss.peak / MIB:.1f} MiB"
    _beats_on_time(rig, since)
    _no_partial_files(rig.plugin_root / "mirror")
    rig.survived()
