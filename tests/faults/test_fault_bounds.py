"""Issue 18: the agent stays inside its memory and disk budgets under hostile archives and
a plugin that floods its stderr.

Each case runs while a healthy plugin (`ticker`, 10 records/s) runs beside the hostile one,
samples the agent's own RSS (its process only, every 20 ms: `RssSampler(tree=False)`), and
ends with: the same PID, heartbeats, the ticker's records still arriving after the fault, a
named reason in state_detail and its heartbeat counter.
"""

from __future__ import annotations

import contextlib
import io
import tarfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
from agentproc import patch_config
from faultrig import (
    BASE,
    BASE_EXE,
    MIB,
    TICKER,
    TICKER_TYPE,
    Rig,
    RssSampler,
    case,
    sh_plugin,
    sha,
)
from floods import long_name_bomb_tar_gz
from hostile import body

RSS_LIMIT = 100 * MIB
GIB = 1024 * MIB
STDERR_CAP = 1 * MIB


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = Rig(tmp_path_factory.mktemp("fault-bounds"))
    patch_config(rig.config, plugins={"stderr_max_bytes": STDERR_CAP})
    with rig:
        yield rig


@pytest.fixture
def rig(shared: Rig) -> Iterator[Rig]:
    yield from case(shared)


def _push(rig: Rig, entry: dict[str, Any]) -> float:
    since = time.time()
    rig.center.send_configs(
        [rig.publish(BASE, BASE_EXE), rig.publish("ticker", TICKER), entry]
    )
    return since


def _ticks_after(rig: Rig, since: float) -> None:
    """The healthy plugin's records still reach the center after `since`."""
    rig.wait(
        lambda: [r for r in rig.center.records(TICKER_TYPE) if r.recv_time > since],
        15,
        "a ticker record after the fault",
    )


def _counted(rig: Rig, since: float, counter: str) -> None:
    rig.wait(
        lambda: [b for b in rig.beats(since) if int(b.fields.get(counter, 0)) > 0],
        10,
        f"{counter} counted in the heartbeat",
    )


def _archive_entry(rig: Rig, name: str, archive: bytes) -> dict[str, Any]:
    rig.hostile.routes[f"/{name}.tar.gz"] = body(archive)
    return {
        "name": name,
        "version": "1",
        "type": "tar.gz",
        "sha256": sha(archive),
        "download_urls": [rig.hostile.url(f"/{name}.tar.gz")],
    }


def test_a_long_name_header_declaring_a_gib(rig: Rig) -> None:
    exe = sh_plugin("exec cat <&3 >/dev/null")
    member = tarfile.TarInfo("longname")
    member.size = len(exe)
    member.mode = 0o755
    tail = member.tobuf(tarfile.GNU_FORMAT) + exe
    archive = long_name_bomb_tar_gz(GIB, tail)
    assert len(archive) < 2 * MIB
    with RssSampler(rig.pid, tree=False) as rss:
        since = _push(rig, _archive_entry(rig, "longname", archive))
        fields = rig.refused(since, "longname", timeout=30)
    assert f"GNU long name header declares {GIB} bytes" in fields["state_detail"]
    _counted(rig, since, "archive_header_cap")
    _ticks_after(rig, time.time())
    print(f"long-name bomb: agent peak RSS {rss.peak / MIB:.1f} MiB ({rss.samples} samples)")
    assert rss.samples > 10
    assert rss.peak <= RSS_LIMIT, f"agent RSS peaked at {rss.peak / MIB:.1f} MiB"
    rig.survived()


def test_a_member_nested_1500_directories_deep(rig: Rig) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.GNU_FORMAT) as tar:
        exe = sh_plugin("exec cat <&3 >/dev/null")
        info = tarfile.TarInfo("deep")
        info.size, info.mode = len(exe), 0o755
        tar.addfile(info, io.BytesIO(exe))
        tar.addfile(tarfile.TarInfo("/".join(["d"] * 1500) + "/f"), io.BytesIO(b""))
    with RssSampler(rig.pid, tree=False) as rss:
        since = _push(rig, _archive_entry(rig, "deep", buf.getvalue()))
        fields = rig.refused(since, "deep", timeout=30)
    assert "nested 1501 levels deep, over the 64 cap" in fields["state_detail"]
    assert not (rig.plugin_root / "deep" / "d").exists()
    _counted(rig, since, "archive_depth_cap")
    _ticks_after(rig, time.time())
    print(f"1,500-deep member: agent peak RSS {rss.peak / MIB:.1f} MiB")
    assert rss.peak <= RSS_LIMIT
    rig.survived()


def test_a_plugin_writing_a_gib_to_stderr(rig: Rig) -> None:
    # 1 GiB to stderr as fast as dd can, then a last line, then it runs on as a plugin does.
    exe = sh_plugin(
        "dd if=/dev/zero bs=1M count=1024 status=none >&2\n"
        "echo 'the last words' >&2\n"
        ": > flooded\n"
        "exec cat <&3 >/dev/null"
    )
    stderr_file = rig.plugin_root / "noisy" / "noisy.stderr"
    sizes: list[int] = []

    def flooded() -> bool:
        with contextlib.suppress(FileNotFoundError):
            sizes.append(stderr_file.stat().st_size)
        return (rig.plugin_root / "noisy" / "flooded").exists()

    with RssSampler(rig.pid, tree=False) as rss:
        since = _push(rig, rig.publish("noisy", exe))
        rig.plugin_beat_after(since, "noisy")
        rig.wait(flooded, 120, "the plugin's 1 GiB written to its stderr")
    assert len(sizes) > 3
    assert max(sizes) <= STDERR_CAP, f"{stderr_file.name} reached {max(sizes)} bytes"
    rig.wait(
        lambda: stderr_file.read_bytes().endswith(b"the last words\n"),
        10,
        "the newest part kept",
    )
    assert stderr_file.stat().st_size <= STDERR_CAP
    # The plugin runs on: a 1001 after the flood, from the same run, with the truncations.
    beat = rig.plugin_beat_after(time.time(), "noisy")
    assert beat["restarts"] == "0"
    assert int(beat["stderr_truncations"]) > 0
    assert int(beat["stderr_dropped_bytes"]) >= GIB - STDERR_CAP
    _counted(rig, since, "plugin_stderr_truncations")
    # The heartbeat says what the agent holds under its work dir, plugins included (as of
    # the last walk, at most a minute old).
    agent_beat = rig.beat_after(time.time())
    assert int(agent_beat["work_dir_bytes"]) >= int(agent_beat["du"]) > 0
    _ticks_after(rig, time.time())
    print(f"1 GiB of stderr: agent peak RSS {rss.peak / MIB:.1f} MiB, file at most {max(sizes)}")
    assert rss.peak <= RSS_LIMIT
    rig.survived()
