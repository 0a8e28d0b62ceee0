"""Issue 9, Configs: no Config entry can end the agent; a bad entry is refused on its own.

Every case ends with `rig.survived()`: the same agent PID is alive and a new 1000 arrives.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultrig import BASE, Rig, case, module_rig, sh_plugin, sha
from hostile import body

from elkeid_agent._proto import grpc_pb2

GOOD_EXE = sh_plugin("exec cat <&3 >/dev/null")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    yield from module_rig(tmp_path_factory.mktemp("fault-configs"))


@pytest.fixture
def rig(shared: Rig) -> Iterator[Rig]:
    yield from case(shared)


def _refused(rig: Rig, name: str, url: str, **extra: str) -> None:
    since = time.time()
    rig.center.send_configs(
        [
            rig.publish(BASE, rig.files.joinpath(BASE).read_bytes()),
            {"name": name, "version": "1", "sha256": sha(GOOD_EXE), "download_urls": [url]},
        ]
    )
    rig.refused(since, name)
    rig.survived()


def test_url_with_a_port_out_of_range(rig: Rig) -> None:
    _refused(rig, "badport", "http://127.0.0.1:99999/p")


def test_url_with_an_unclosed_ipv6_bracket(rig: Rig) -> None:
    _refused(rig, "badv6", "http://[::1/p")


def test_url_with_nul(rig: Rig) -> None:
    rig.hostile.routes["/a"] = body(GOOD_EXE)
    _refused(rig, "nulurl", rig.hostile.url("/a\x00b"))
    assert not [h for h in rig.hostile.heads if b"\x00" in h], "a NUL went on the wire"


def test_detail_with_nul(rig: Rig) -> None:
    since = time.time()
    entry = {**rig.publish("nuldetail", GOOD_EXE), "detail": "a\x00b"}
    rig.center.send_configs([rig.publish(BASE, rig.files.joinpath(BASE).read_bytes()), entry])
    # Refused, never started with the detail cut at the NUL.
    rig.refused(since, "nuldetail")
    rig.survived()


def test_a_thousand_entries(rig: Rig) -> None:
    rig.hostile.routes["/missing"] = body(b"")  # sha mismatch for every entry, quickly
    configs = [
        {
            "name": f"n{i:04d}",
            "version": "1",
            "sha256": sha(b"%d" % i),
            "download_urls": [rig.hostile.url("/missing")],
        }
        for i in range(1000)
    ]
    since = time.time()
    rig.center.send_configs(configs)
    # Heartbeats go on while the set is worked through, and the set ends refused or failed.
    rig.beat_after(since + 1.0, timeout=10)
    rig.wait(
        lambda: [b for b in rig.beats(since) if b.fields["state"] == "abnormal"],
        60,
        "an abnormal heartbeat after 1,000 failing entries",
    )
    rig.survived()
    # And the agent is not stuck: the next set applies within the reset's bound.
    rig.reset(timeout=60)


def test_every_field_of_the_wrong_shape(rig: Rig) -> None:
    good = rig.publish("goodone", GOOD_EXE)
    url = good["download_urls"]
    bad = [
        {"name": "../x", "version": "1", "sha256": sha(GOOD_EXE), "download_urls": url},
        {"name": "", "version": "1", "sha256": sha(GOOD_EXE), "download_urls": url},
        {"name": "a" * 300, "version": "1", "sha256": sha(GOOD_EXE), "download_urls": url},
        {"name": "badsha", "version": "1", "sha256": "zz-not-hex", "download_urls": url},
        {"name": "nourls", "version": "1", "sha256": sha(b"absent"), "download_urls": []},
        {
            "name": "junk",
            "type": "tar.gz\x00",
            "version": "\x01\n",
            "sha256": "",
            "signature": "\x00",
            "download_urls": ["", " ", "ftp://127.0.0.1/x", "http://", "\x00"],
            "detail": "\n",
        },
    ]
    since = time.time()
    rig.center.send_configs([rig.publish(BASE, GOOD_EXE), *bad, good])
    # One bad entry is one refused unit: the good one in the same set runs.
    rig.plugin_beat_after(since, "goodone")
    for name in ("../x", "badsha", "nourls", "junk"):
        rig.detail_after(since, name)
    started = {r.fields.get("name") for r in rig.center.records(1001) if r.recv_time > since}
    assert started <= {BASE, "goodone"}
    assert not (rig.work / "x").exists()
    assert not (rig.plugin_root.parent / "x").exists()
    rig.survived()


def test_config_with_invalid_utf8_is_dropped(rig: Rig) -> None:
    """protobuf refuses a `string` that is not UTF-8: the Command is undecodable."""
    name = b"\xff\xfe"
    config = b"\x0a" + bytes([len(name)]) + name  # Config.name
    raw = b"\x1a" + bytes([len(config)]) + config  # Command.configs
    before = int(rig.beat_after(time.time() - 1)["command_failures"])
    since = time.time()
    rig.center.send_raw_command(raw)
    rig.wait(
        lambda: [b for b in rig.beats(since) if int(b.fields["command_failures"]) > before],
        10,
        "command_failures counted the undecodable Command",
    )
    assert rig.plugin_dirs() == {BASE}
    rig.survived()


def test_the_empty_command_stops_every_plugin(rig: Rig) -> None:
    rig.plugin_beat_after(0, BASE)
    pid = int([r for r in rig.center.records(1001) if r.fields["name"] == BASE][-1].fields["pid"])
    assert Path(f"/proc/{pid}").exists()
    began = time.monotonic()
    assert rig.center.send_command(grpc_pb2.Command()) == 1
    rig.wait(
        lambda: not (rig.plugin_root / BASE).exists() and not _alive(pid),
        15,
        "plugin base stopped and its directory removed",
    )
    assert time.monotonic() - began < 15
    rig.survived()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"
