"""The pure part of plugin cgroups: layouts from /proc text, files to write, figures read back,
the kill procedure, the subreaper's choice of processes, and the limits in the config."""

from __future__ import annotations

import pytest

from elkeid_agent.config import ConfigError, PluginsConfig, _convert
from elkeid_agent.plugins import subreaper
from elkeid_agent.plugins.cgroup_plan import (
    Hierarchy,
    KillStep,
    Layout,
    Limits,
    Version,
    is_frozen,
    kill_plan,
    limit_writes,
    parse_keyed,
    plan_layout,
    plugin_dirs,
    usage_from,
)

# CentOS 7: cpu and cpuacct share a hierarchy; the agent runs as a systemd service.
CENTOS7_MOUNTS = """\
25 18 0:21 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
26 25 0:22 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,xattr,name=systemd
29 25 0:25 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpuacct,cpu
30 25 0:26 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
31 25 0:27 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids
32 25 0:28 / /sys/fs/cgroup/freezer rw,nosuid - cgroup cgroup rw,freezer
"""
CENTOS7_SELF = """\
10:pids:/system.slice/elkeid-agent.service
5:freezer:/
4:memory:/system.slice/elkeid-agent.service
3:cpuacct,cpu:/system.slice/elkeid-agent.service
1:name=systemd:/system.slice/elkeid-agent.service
"""
V2_MOUNTS = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V2_SELF = "0::/system.slice/elkeid-agent.service\n"


def test_v1_layout_with_combined_cpu_and_cpuacct() -> None:
    layout = plan_layout(CENTOS7_SELF, CENTOS7_MOUNTS)
    assert isinstance(layout, Layout)
    assert layout.version is Version.V1
    cpu = layout.by_controller("cpuacct")
    assert cpu is layout.by_controller("cpu")
    assert cpu is not None
    assert cpu.agent_dir == "/sys/fs/cgroup/cpu,cpuacct/system.slice/elkeid-agent.service"
    freezer = layout.by_controller("freezer")
    assert freezer is not None
    assert freezer.agent_dir == "/sys/fs/cgroup/freezer"
    assert plugin_dirs(layout, "g", "p")[1] == (
        "/sys/fs/cgroup/memory/system.slice/elkeid-agent.service/g/p"
    )


def test_v2_layout_and_what_cannot_be_used() -> None:
    layout = plan_layout(V2_SELF, V2_MOUNTS)
    assert layout == Layout(
        Version.V2, (Hierarchy(frozenset(), "/sys/fs/cgroup/system.slice/elkeid-agent.service"),)
    )
    # A cgroup namespace or a mount of another subtree does not show our cgroup.
    other = V2_MOUNTS.replace(" / /sys", " /other /sys")
    assert plan_layout(V2_SELF, other) == "no cgroup hierarchy of this process is mounted"
    assert plan_layout("0::/../x\n", V2_MOUNTS) == "no cgroup hierarchy of this process is mounted"
    assert "no cgroup membership" in str(plan_layout("", V2_MOUNTS))
    # Mount points with a space are octal-escaped in mountinfo.
    spaced = V2_MOUNTS.replace("/sys/fs/cgroup", "/mnt/a\\040b")
    layout = plan_layout("0::/\n", spaced)
    assert isinstance(layout, Layout)
    assert layout.hierarchies[0].agent_dir == "/mnt/a b"


def test_limit_files() -> None:
    v1 = Layout(Version.V1, ())
    limits = Limits(memory_bytes=64 << 20, cpu_percent=25.0, cpu_weight=50, pids=100)
    assert limit_writes(v1, limits, {"memory", "cpu", "pids"}) == [
        ("memory", "memory.limit_in_bytes", str(64 << 20)),
        ("memory", "memory.memsw.limit_in_bytes", str(64 << 20)),
        ("cpu", "cpu.shares", "512"),
        ("cpu", "cpu.cfs_period_us", "100000"),
        ("cpu", "cpu.cfs_quota_us", "25000"),
        ("pids", "pids.max", "100"),
    ]
    v2 = Layout(Version.V2, ())
    assert limit_writes(v2, limits, {"memory", "cpu", "pids"}) == [
        ("memory", "memory.max", str(64 << 20)),
        ("memory", "memory.swap.max", "0"),
        ("memory", "memory.oom.group", "1"),
        ("cpu", "cpu.weight", "50"),
        ("cpu", "cpu.max", "25000 100000"),
        ("pids", "pids.max", "100"),
    ]
    # No controller, no write; 0 is no limit; a tiny quota is raised to the kernel's minimum.
    assert limit_writes(v2, limits, set()) == []
    assert limit_writes(v1, Limits(), {"memory", "cpu", "pids"}) == []
    assert limit_writes(v1, Limits(cpu_percent=0.5), {"cpu"})[1][2] == "1000"


def test_usage_read_back() -> None:
    v1 = usage_from(
        Version.V1,
        {
            "cgroup.procs": "12\n13\n",
            "cpuacct.usage": "2500000000\n",
            "cpu.stat": "nr_periods 50\nnr_throttled 7\nthrottled_time 350000000\n",
            "memory.stat": "cache 4096\nrss 8192\ntotal_rss 12288\n",
            "memory.limit_in_bytes": "9223372036854771712\n",
            "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        },
    )
    assert (v1.cpu_seconds, v1.memory_bytes, v1.memory_limit, v1.oom_kills) == (2.5, 12288, 0, 2)
    assert (v1.throttled_periods, v1.throttled_seconds, v1.procs) == (7, 0.35, 2)
    v2 = usage_from(
        Version.V2,
        {
            "cgroup.procs": "12\n",
            "cpu.stat": "usage_usec 1500000\nnr_throttled 3\nthrottled_usec 20000\n",
            "memory.events": "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\noom_group_kill 1\n",
            "memory.stat": "anon 4096\nfile 8192\n",
            "memory.max": "max\n",
        },
    )
    assert (v2.cpu_seconds, v2.memory_bytes, v2.memory_limit, v2.oom_kills) == (1.5, 4096, 0, 1)
    assert (v2.throttled_periods, v2.throttled_seconds, v2.procs) == (3, 0.02, 1)
    # A missing controller is a missing figure, not a zero.
    bare = usage_from(Version.V1, {"cgroup.procs": ""})
    assert (bare.cpu_seconds, bare.oom_kills, bare.procs) == (None, None, 0)
    assert parse_keyed("a 1\nb x\nc\n") == {"a": 1}


def test_kill_plans() -> None:
    assert kill_plan(Version.V2, True, True) == [KillStep.CGROUP_KILL]
    assert kill_plan(Version.V2, False, True)[:3] == [
        KillStep.FREEZE,
        KillStep.SIGNAL_ALL,
        KillStep.THAW,
    ]
    assert kill_plan(Version.V1, True, False) == [KillStep.SIGNAL_UNTIL_EMPTY]
    assert is_frozen(Version.V1, "FROZEN\n")
    assert not is_frozen(Version.V1, "FREEZING\n")
    assert is_frozen(Version.V2, "populated 1\nfrozen 1\n")


def test_the_subreaper_picks_the_run_and_what_it_left_with_the_agent() -> None:
    P = subreaper.Proc
    procs = [
        P(10, 1, None),  # the agent
        P(20, 10, "run-a"),  # plugin a
        P(21, 20, "run-a"),  # its child
        P(30, 10, "run-a"),  # a's daemon, re-parented to the agent
        P(31, 30, None),  # the daemon's child, environment cleared
        P(40, 10, "run-b"),  # another plugin's daemon
        P(50, 1, "run-a"),  # not the agent's: another agent's, or older
    ]
    assert subreaper.to_kill(procs, 20, 10, "run-a") == {20, 21, 30, 31}
    assert subreaper.parse_environ_tag(b"A=1\0ELKEID_PLUGIN_RUN=x.1\0") == "x.1"
    assert subreaper.parse_environ_tag(b"A=1\0") is None


def test_limits_in_the_config() -> None:
    config = PluginsConfig()
    assert config.limits_of("any") == (200 << 20, 0.0, 50, 512)
    raw = {"plugins": {"limits_for": {"driver": {"memory_bytes": 0, "cpu_percent": 50}}}}
    tuned = _convert(raw, "t.toml").plugins
    assert tuned.limits_of("driver") == (0, 50.0, 50, 512)
    assert tuned.limits_of("collector") == (200 << 20, 0.0, 50, 512)
    for bad, key in (
        ({"limits": {"memory_bytes": 1000}}, "plugins.limits"),
        ({"limits_for": {"x": {"cpu_percent": 0.5}}}, r"plugins.limits_for\[...\]"),
        ({"cgroup_name": "../x"}, "plugins.cgroup_name"),
        ({"cgroup_name": "agent"}, "plugins"),
    ):
        with pytest.raises(ConfigError, match=f"key {key}"):
            _convert({"plugins": bad}, "t.toml")
