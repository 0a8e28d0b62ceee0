"""Plugin cgroups for real (issue 20): descendants that leave the process group, limits the
kernel enforces, the cgroup v2 membership and kill, and the subreaper fallback.

This host mounts cgroup v1 (memory, cpu, cpuacct, pids, freezer); the v2 tests mount a
cgroup2 hierarchy of their own (no controller is free for it here: membership and kill only).
Every test uses a cgroup group name of its own and removes it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from plugtools import (
    BIN,
    REPO,
    Harness,
    install_plugin,
    local_spec,
    run,
    sh_plugin,
    unique_cgroup_name,
    until,
)

from elkeid_agent.config import PluginsConfig
from elkeid_agent.plugins import cgroups as cgroupfs
from elkeid_agent.plugins.cgroup_plan import Hierarchy, Layout, Limits, Version, trampoline_argv

pytestmark = pytest.mark.skipif(
    not cgroupfs.probe().usable, reason="needs a writable cgroup hierarchy"
)


def marked(mark: str) -> list[int]:
    """Live processes whose environment carries TEST_MARK=mark (what a plugin started)."""
    needle = f"TEST_MARK={mark}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                out.append(int(entry))
        except OSError:
            continue
    return out


def sessions(pids: list[int]) -> set[int]:
    out = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            out.add(int(stat[stat.rindex(")") + 2 :].split()[3]))
    return out


def escaping(mark: str) -> dict[str, bytes]:
    """A plugin with a `setsid` grandchild and one that double-forks a daemon."""
    loop = "while :; do sleep 1; done"
    return {
        "setsid": sh_plugin(f"export TEST_MARK={mark}\nsetsid sh -c '{loop}' &\n{loop}"),
        "double": sh_plugin(f"export TEST_MARK={mark}\nsh -c \"sh -c '{loop}' &\"\n{loop}"),
    }


def test_removal_ends_setsid_and_double_forked_descendants(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    plugins = escaping(mark)
    for name, exe in plugins.items():
        install_plugin(tmp_path, name, exe)

    async def main() -> None:
        async with Harness(tmp_path) as h:
            await h.sup.sync([local_spec(n, exe) for n, exe in plugins.items()])
            # Each plugin: its shell, its escaped shell, and their sleeps.
            await until(lambda: len(marked(mark)) >= 6, what="descendants")
            assert len(sessions(marked(mark))) >= 2  # the setsid one left the session
            assert "plugin limits in effect" in h.sup.limits_state
            # The defaults, read back from the plugin's cgroup files.
            cgroup = h.sup._slots["setsid"].cgroup
            assert cgroup is not None
            files = {
                "memory": ("memory.limit_in_bytes", str(200 << 20)),
                "cpu": ("cpu.shares", "512"),
                "pids": ("pids.max", "512"),
            }
            for controller, (name, value) in files.items():
                directory = cgroup.dirs.get(controller)
                if directory is not None:
                    with open(f"{directory}/{name}") as fh:  # noqa: ASYNC230 - a cgroup file
                        assert fh.read().strip() == value
            await h.sup.sync([])
            assert marked(mark) == []

    run(main())


def test_a_plugin_that_moves_into_a_cgroup_of_its_own_below_is_stopped_all_the_same(
    tmp_path: Path,
) -> None:
    # Plugins run as root: one may nest cgroups (v1 lists a cgroup's direct members only).
    mark = uuid.uuid4().hex
    nest = sh_plugin(
        f"export TEST_MARK={mark}\n"
        "for line in $(cat /proc/self/cgroup); do\n"
        "  rest=${line#*:}; ctl=${rest%%:*}; path=${rest#*:}\n"
        "  for m in $(awk '$3 == \"cgroup\" {print $2}' /proc/mounts); do\n"
        "    case \",$(grep \" $m \" /proc/mounts | cut -d' ' -f4),\" in\n"
        "      *,$ctl,*) mkdir -p $m$path/sub && echo $$ > $m$path/sub/cgroup.procs ;;\n"
        "    esac\n"
        "  done\n"
        "done\n"
        "setsid sh -c 'while :; do sleep 1; done' &\nwhile :; do sleep 1; done"
    )
    install_plugin(tmp_path, "nest", nest)

    async def main() -> None:
        async with Harness(tmp_path) as h:
            await h.sup.sync([local_spec("nest", nest)])
            await until(lambda: len(marked(mark)) >= 3, what="descendants")
            pid = marked(mark)[0]
            await until(lambda: "/nest/sub" in Path(f"/proc/{pid}/cgroup").read_text())
            await h.sup.sync([])
            assert marked(mark) == []

    run(main())


def test_a_restart_after_sigkill_ends_what_the_previous_agent_left(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    group = unique_cgroup_name()
    for name, exe in escaping(mark).items():
        install_plugin(tmp_path, name, exe)
    proc = subprocess.Popen(
        [sys.executable, str(BIN / "run_supervisor.py"), str(tmp_path), "setsid", "double"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "ELKEID_TEST_CGROUP": group},
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("limits plugin limits in effect")
    assert proc.stdout.readline().startswith("ready")
    deadline = time.monotonic() + 10
    while len(marked(mark)) < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    time.sleep(0.3)
    assert len(marked(mark)) >= 6  # a hard-killed agent leaves its plugins running

    async def main() -> None:
        async with Harness(tmp_path, PluginsConfig(cgroup_name=group)) as h:
            await until(h.sup._ready.is_set)
            await until(lambda: not marked(mark), limit=5, what="leftovers swept")

    run(main())


def test_the_subreaper_fallback_ends_every_descendant(tmp_path: Path) -> None:
    # Its own process: a subreaper setting lasts for the life of the process.
    mark = uuid.uuid4().hex
    for name, exe in escaping(mark).items():
        install_plugin(tmp_path, name, exe)
    env = {
        "PYTHONPATH": str(REPO),
        "ELKEID_TEST_CGROUP": unique_cgroup_name(),
        "ELKEID_TEST_CGROUPS": "0",
    }
    proc = subprocess.Popen(
        [sys.executable, str(BIN / "run_supervisor.py"), str(tmp_path), "setsid", "double"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    assert proc.stdout is not None
    limits = proc.stdout.readline()
    assert "not in effect" in limits, limits
    assert "child subreaper" in limits, limits
    assert proc.stdout.readline().startswith("ready")
    deadline = time.monotonic() + 10
    while len(marked(mark)) < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(marked(mark)) >= 6
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert marked(mark) == []


# -- cgroup v2: a hierarchy of the test's own ---------------------------------------------------


@pytest.fixture
def cgroup2() -> Iterator[str]:
    """A cgroup2 mount, and a directory of this test's own in it."""
    mount = tempfile.mkdtemp(prefix="elkeid-cg2-")
    if subprocess.run(["mount", "-t", "cgroup2", "none", mount], check=False).returncode:
        os.rmdir(mount)
        pytest.skip("cannot mount cgroup2")
    base = f"{mount}/{unique_cgroup_name()}"
    os.mkdir(base)
    try:
        yield base
    finally:
        for path in sorted(Path(base).glob("**/"), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                path.rmdir()
        subprocess.run(["umount", mount], check=False)
        os.rmdir(mount)


@pytest.mark.parametrize("kill_file", [True, False], ids=["cgroup.kill", "freeze"])
def test_v2_membership_and_kill(cgroup2: str, kill_file: bool, tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    script = tmp_path / "escape.sh"
    loop = "while :; do sleep 1; done"
    script.write_bytes(
        sh_plugin(
            f"export TEST_MARK={mark}\nsetsid sh -c '{loop}' &\n"
            f"sh -c \"sh -c '{loop}' &\"\n{loop}"
        )
    )
    script.chmod(0o755)
    cgroups = cgroupfs.Cgroups("group", Layout(Version.V2, (Hierarchy(frozenset(), cgroup2),)))
    os.mkdir(f"{cgroup2}/group")
    cgroup = cgroups.create("p", Limits())
    argv = trampoline_argv("/bin/sh", "p", str(tmp_path), str(script), cgroup.procs_files())
    pid = os.posix_spawn("/bin/sh", argv, os.environ)
    try:
        deadline = time.monotonic() + 10
        while len(marked(mark)) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        members = cgroup.members()
        assert set(marked(mark)) <= members
        assert len(members) >= 5
        for member in members:
            line = Path(f"/proc/{member}/cgroup").read_text().splitlines()[-1]
            assert line == f"0::/{Path(cgroup2).name}/group/p"
        assert cgroup.kill(use_kill_file=kill_file) >= 5
        assert marked(mark) == []
        assert cgroup.members() == set()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert cgroup.remove()


def test_a_failed_join_ends_the_start(tmp_path: Path) -> None:
    argv = trampoline_argv("/bin/sh", "p", str(tmp_path), "/bin/true", [str(tmp_path / "no/such")])
    status = subprocess.run(argv, check=False, capture_output=True)
    assert status.returncode == 125




def test_a_hybrid_host_whose_v1_controllers_are_read_only_places_plugins_on_v2(
    cgroup2: str, tmp_path: Path
) -> None:
    # What systemd-nspawn gives a container on a v1 host: controllers mounted read-only, a
    # writable cgroup2 mount with no controller. /proc texts of such a host, the real mount.
    mount, base = os.path.dirname(cgroup2), os.path.basename(cgroup2)
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self/cgroup").write_text(f"4:memory:/\n1:cpu:/\n0::/{base}\n")
    (proc / "self/mountinfo").write_text(
        f"48 45 0:32 / {tmp_path}/ro/memory ro - cgroup cgroup rw,memory\n"
        f"51 45 0:29 / {tmp_path}/ro/cpu ro - cgroup cgroup rw,cpu\n"
        f"55 45 0:38 / {mount} rw - cgroup2 cgroup rw\n"
    )
    found = cgroupfs.discover("group", proc)
    assert found.layout == Layout(Version.V2, (Hierarchy(frozenset(), cgroup2),))
    line = found.describe()
    assert line.startswith("plugin limits partly in effect (cgroup v2, controllers: none)"), line
    assert "no cgroup v1 hierarchy writable" in line
    cgroup = found.create("p", Limits(memory_bytes=64 << 20))
    sleeper = tmp_path / "sleeper"
    sleeper.write_bytes(sh_plugin("exec sleep 100"))
    sleeper.chmod(0o755)
    argv = trampoline_argv("/bin/sh", "p", str(tmp_path), str(sleeper), cgroup.procs_files())
    pid = os.posix_spawn("/bin/sh", argv, os.environ)
    try:
        deadline = time.monotonic() + 5
        while not cgroup.members() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cgroup.members() == {pid}
        cgroup.kill()
        assert cgroup.members() == set()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert cgroup.remove()
    found.remove_group()
