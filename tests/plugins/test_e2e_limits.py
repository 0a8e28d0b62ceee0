"""Per-plugin limits through the whole agent (issue 20): the kernel enforces them on the plugin
alone, and the agent, its heartbeats and its other plugins go on.

Real cgroups (v1 on this host), a real agent process, a real center over mTLS.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
import tomllib
from pathlib import Path

import pytest
from agentproc import AgentProcess
from conftest import AgentConfig
from plugtools import sh_plugin, sha

from elkeid_agent.plugins import cgroups as cgroupfs
from elkeid_center.store import DecodedRecord
from elkeid_center.testing import CenterThread

pytestmark = pytest.mark.skipif(
    not cgroupfs.probe().usable, reason="needs a writable cgroup hierarchy"
)

TRANSPORT = {"heartbeat_interval": 1.0, "dial_timeout": 1.0, "backoff_initial": 0.2}
#: The CPU window: 5 s in the suite; ELKEID_CPU_WINDOW=20 for the issue's own measurement.
CPU_WINDOW = float(os.environ.get("ELKEID_CPU_WINDOW", "5"))
STREAM = sh_plugin("while :; do printf '\\003\\000\\000\\000\\010\\347\\007' >&4; sleep 0.05; done")


def _publish(center: CenterThread, files: Path, name: str, exe: bytes) -> dict[str, object]:
    files.mkdir(parents=True, exist_ok=True)
    (files / name).write_bytes(exe)
    url = center.file_url(name)
    return {"name": name, "version": "1", "sha256": sha(exe), "download_urls": [url]}


def _beats(center: CenterThread, name: str) -> list[dict[str, str]]:
    return [r.fields for r in center.records(1001) if r.fields["name"] == name]


def _on_time(beats: list[DecodedRecord], interval: float) -> None:
    """Consecutive 1000s no further apart than two intervals (timestamps are whole seconds)."""
    stamps = [b.timestamp for b in beats]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert gaps
    assert max(gaps) <= 2 * interval + 1, gaps


def test_a_plugin_over_its_memory_limit_is_killed_alone(
    center: CenterThread, agent_config: AgentConfig, tmp_path: Path
) -> None:
    # A leak of 20 MiB/s: each run lives about 1.5 s, so 1 s heartbeats see it between kills
    # (only a running plugin has a 1001).
    hog = sh_plugin(
        f"exec '{sys.executable}' -c 'import time\n"
        "b = []\n"
        "while True:\n"
        "    b.append(b\"x\" * (1 << 20))\n"
        "    time.sleep(0.05)\n'"
    )
    files = tmp_path / "files"
    center.set_configs(
        [_publish(center, files, "hog", hog), _publish(center, files, "stream", STREAM)]
    )
    limits = {"limits_for": {"hog": {"memory_bytes": 32 << 20}}}
    with AgentProcess(agent_config(transport=TRANSPORT, plugins=limits)) as agent:

        def killed() -> dict[str, str] | None:
            beats = [b for b in _beats(center, "hog") if int(b.get("oom_kills", 0)) >= 1]
            return beats[-1] if beats else None

        beat = center.wait_for(killed, timeout=30)
        assert int(beat["restarts"]) >= 1
        assert int(beat["memory_limit"]) == 32 << 20
        streamed = len(center.records(999))
        # The other plugin's records keep flowing, and the hog is started again.
        center.wait_for(lambda: len(center.records(999)) > streamed + 10, timeout=10)
        restarts = int(beat["restarts"])
        center.wait_for(
            lambda: int(_beats(center, "hog")[-1]["restarts"]) > restarts, timeout=15
        )
        assert agent.proc is not None
        assert agent.proc.poll() is None
        beats = center.records(1000)
        assert {b.fields["pid"] for b in beats} == {str(agent.pid)}
        _on_time(beats, TRANSPORT["heartbeat_interval"])
        assert int(beats[-1].fields.get("plugin_oom_kills", 0)) >= 1
        assert agent.stop() == 0


def test_a_plugin_spinning_on_every_cpu_is_held_to_its_quota(
    center: CenterThread, agent_config: AgentConfig, tmp_path: Path
) -> None:
    cpus = os.cpu_count() or 1
    spin = sh_plugin(f"for i in $(seq {cpus}); do (while :; do :; done) & done\nwait")
    center.set_configs([_publish(center, tmp_path / "files", "spin", spin)])
    quota = 20.0
    limits = {"limits_for": {"spin": {"cpu_percent": quota}}}
    config = agent_config(transport=TRANSPORT, plugins=limits)
    group = tomllib.loads(config.read_text())["plugins"]["cgroup_name"]
    with AgentProcess(config) as agent:
        center.wait_for(lambda: _beats(center, "spin"), timeout=20)
        own = Path(f"/proc/{agent.pid}/cgroup").read_text().splitlines()
        path = next(line.split(":", 2)[2] for line in own if "cpuacct" in line.split(":")[1])
        usage = Path(f"/sys/fs/cgroup/cpuacct{path.rstrip('/')}/{group}/spin/cpuacct.usage")
        time.sleep(1)  # every spinner started
        first = len(center.records(1000))
        began, before = time.monotonic(), int(usage.read_text())
        time.sleep(CPU_WINDOW)
        elapsed, used = time.monotonic() - began, int(usage.read_text()) - before
        cores = used / 1e9 / elapsed
        print(f"spin: {cores:.4f} cores over {elapsed:.1f} s, quota {quota / 100:.2f}")
        # The quota is enforced per 100 ms period: over 5 s it holds to a few percent. Below
        # it only by what this loaded 2-core host leaves.
        assert quota / 200 <= cores <= quota / 100 * 1.05 + 0.005
        beat = center.wait_for(
            lambda: [b for b in _beats(center, "spin") if int(b["cpu_throttled_periods"]) > 0],
            timeout=5,
        )[-1]
        assert int(beat["procs"]) >= cpus + 1
        _on_time(center.records(1000)[first:], TRANSPORT["heartbeat_interval"])
        assert agent.stop() == 0
