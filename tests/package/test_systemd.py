"""The deb under a real systemd: a Debian 12 root booted with systemd-nspawn.

One container per module (booting takes seconds); the tests run in order, each on the
state the previous one left: install -> running and heartbeating -> watchdog pings ->
SIGKILL and restart -> stop kills plugins -> purge. The container shares the host's
network, so the packaged agent reaches the local center on 127.0.0.1 at the port baked
into the test product config, with the packaged test certificates: no config file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from elkeid_agent.plugins.cgroup_plan import V1_CONTROLLERS, parse_mountinfo
from elkeid_center.testing import CenterThread

from .conftest import PRODUCT_PORT, Dist, cached_root

pytestmark = [pytest.mark.package, pytest.mark.timeout(1800)]

UNIT = "elkeid-agent.service"
UNIT_D = f"/run/systemd/system/{UNIT}.d"
RESTART_SEC = 45
# A plugin that ignores SIGTERM and leaves a detached grandchild (another session, so
# outside the plugin's process group) behind: only killing the whole cgroup
# (KillMode=control-group) takes both. The grandchild starts before the trap, so it dies
# on systemd's SIGTERM instead of holding every stop for TimeoutStopSec.
PLUGIN_MARK = "86399"
PLUGIN = f"""#!/bin/sh
setsid sleep {PLUGIN_MARK} </dev/null >/dev/null 2>&1 &
trap '' TERM
exec cat <&3 >/dev/null
""".encode()


class ContainerCgroups:
    """A cgroup of this container's own, made in every hierarchy nspawn and the container's
    systemd write to, and removed after it.

    nspawn alone puts its payload at <its cgroup>/payload in the name=systemd (and unified)
    hierarchy, shared by every container started from the same cgroup (another session's
    tests), and on a cgroup v1 host it mounts the controller hierarchies read-only in the
    container, so the container's systemd applies no MemoryMax=, CPUQuota= or TasksMax=.
    Started inside these cgroups (and so inside its own cgroup namespace there), the container
    sees only its own subtree of each hierarchy; `writable` names the v1 hierarchies the agent's
    plugin cgroups use, which the container's init remounts read-write before systemd starts:
    what a systemd that owns a v1 host's hierarchies has.
    """

    def __init__(self, name: str) -> None:
        self.dirs: list[Path] = []
        self.writable: list[str] = []
        mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, field, path = line.split(":", 2)
            controllers = set(field.split(",")) if field else set()
            delegated = bool(controllers & set(V1_CONTROLLERS))
            if not (delegated or field in ("", "name=systemd")):
                continue
            fstype = "cgroup" if field else "cgroup2"
            mount = next(
                (
                    m
                    for m in mounts
                    if m.fstype == fstype and m.root == "/" and controllers <= m.options
                ),
                None,
            )
            if mount is None:
                continue
            own = Path(mount.mount_point) / path.lstrip("/") / name
            try:
                own.mkdir(exist_ok=True)
            except OSError:
                # A hierarchy this host does not let us write: the container gets nspawn's
                # defaults there, and a test that needs it says so.
                continue
            self.dirs.append(own)
            if delegated:
                self.writable.append(field)

    def enter(self, argv: list[str]) -> list[str]:
        """argv run by a shell that first moves itself into these cgroups."""
        script = 'while [ "$1" != -- ]; do echo $$ >"$1" || exit; shift; done; shift; exec "$@"'
        procs = [str(d / "cgroup.procs") for d in self.dirs]
        return ["sh", "-c", script, "sh", *procs, "--", *argv]

    def remove(self) -> None:
        """Remove them, deepest first; the container's last processes may take a moment to
        leave after nspawn exits."""
        deadline = time.monotonic() + 10
        for top in self.dirs:
            below = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
            for d in [*below, top]:
                while True:
                    try:
                        d.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError as e:
                        if e.errno != errno.EBUSY or time.monotonic() > deadline:
                            raise
                        time.sleep(0.2)


class Container:
    def __init__(
        self, root: Path, dist: Path, log: Path, cgroups: ContainerCgroups | None = None
    ) -> None:
        """`cgroups`: the container's own cgroups (limits that apply); without them, nspawn's
        defaults (the upgrade tests read no limits)."""
        self.log = log
        nspawn = [
            "systemd-nspawn",
            "-x",
            "-D",
            str(root),
            "--register=no",
            "--keep-unit",
            "--console=pipe",
            f"--bind-ro={dist}:/mnt/dist",
        ]
        if cgroups is not None and cgroups.writable:
            # What -b does, with the hierarchies remounted read-write before systemd starts
            # (it decides once, at start, which controllers it can use).
            init = (
                'for h; do mount -o remount,bind,rw "/sys/fs/cgroup/$h" || exit; done; '
                "exec /lib/systemd/systemd"
            )
            nspawn += ["--kill-signal=SIGRTMIN+3", "/bin/sh", "-c", init, "sh", *cgroups.writable]
        else:
            nspawn.insert(1, "-b")
        self.proc = subprocess.Popen(
            cgroups.enter(nspawn) if cgroups is not None else nspawn,
            stdin=subprocess.DEVNULL,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        try:
            self.leader = self._wait_leader()
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def _wait_leader(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text(errors="replace")
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            pids = children.read_text().split() if children.exists() else []
            if pids:
                leader = int(pids[0])
                state = self.sh("systemctl is-system-running", check=False, pid=leader)
                if state.stdout.strip() in ("running", "degraded"):
                    return leader
            time.sleep(0.5)
        raise AssertionError("container did not boot:\n" + self.log.read_text(errors="replace"))

    def sh(
        self, script: str, check: bool = True, timeout: float = 120, pid: int | None = None
    ) -> subprocess.CompletedProcess[str]:
        target = pid if pid is not None else self.leader
        proc = subprocess.run(
            ["nsenter", "-t", str(target), "-a", "/bin/sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check:
            assert proc.returncode == 0, f"{script}: {proc.returncode}\n{proc.stdout}{proc.stderr}"
        return proc

    def processes(self, needle: str) -> list[str]:
        """Command lines (pid first) containing needle (minbase has no pgrep)."""
        script = (
            "for p in /proc/[0-9]*; do "
            "c=$(tr '\\0' ' ' < $p/cmdline 2>/dev/null) && [ -n \"$c\" ] && "
            'echo "${p#/proc/} $c"; done'
        )
        lines = self.sh(script, check=False).stdout.splitlines()
        return [line for line in lines if needle in line and "/proc/[0-9]" not in line]

    def prop(self, name: str) -> str:
        return self.sh(f"systemctl show {UNIT} -p {name} --value").stdout.strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.sh("systemctl poweroff", check=False, timeout=30)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_for(what: str, predicate: Callable[[], object], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s: {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def center(amd64_dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CenterThread]:
    files = tmp_path_factory.mktemp("plugin-files")
    (files / "stubborn").write_bytes(PLUGIN)
    with CenterThread(amd64_dist.certs, files_dir=files, port=PRODUCT_PORT) as c:
        c.set_configs(
            [
                {
                    "name": "stubborn",
                    "version": "1.0.0",
                    "sha256": hashlib.sha256(PLUGIN).hexdigest(),
                    "download_urls": [c.file_url("stubborn")],
                }
            ]
        )
        yield c


@pytest.fixture(scope="module")
def container(amd64_dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    if shutil.which("systemd-nspawn") is None:
        pytest.skip("systemd-nspawn is missing")
    root = cached_root("bookworm-systemd")
    log = tmp_path_factory.mktemp("nspawn") / "console.log"
    cgroups = ContainerCgroups(f"elkeid-test-nspawn-{os.getpid()}")
    try:
        c = Container(root, amd64_dist.dir, log, cgroups)
        try:
            yield c
        finally:
            c.close()
    finally:
        cgroups.remove()


def test_install_starts_the_service_via_ready(
    container: Container, center: CenterThread, amd64_dist: Dist
) -> None:
    container.sh(f"dpkg -i /mnt/dist/{amd64_dist.deb.name}")
    verify = container.sh(f"systemd-analyze verify /lib/systemd/system/{UNIT} 2>&1")
    assert verify.stdout == "", verify.stdout
    # Type=notify: "active" only after READY=1 from the Python process (not the main pid).
    wait_for("active (running)", lambda: container.prop("ActiveState") == "active", 120)
    assert container.prop("SubState") == "running"
    assert container.prop("UnitFileState") == "enabled"
    center.wait_records(1000, timeout=120)


def test_ctl_status_reports_the_running_agent(container: Container, amd64_dist: Dist) -> None:
    def connected() -> bool:
        out = container.sh("/etc/elkeid/elkeid-agent ctl status", check=False).stdout
        return "connection: connected" in out and "last heartbeat: never" not in out

    wait_for("ctl status shows a connected agent", connected, 120)
    out = container.sh("/etc/elkeid/elkeid-agent ctl status").stdout
    assert "service: active (running), enabled" in out
    assert f"pid: {container.prop('MainPID')}" in out
    assert f"version: {amd64_dist.version}" in out


def test_watchdog_pings_arrive(container: Container) -> None:
    """WatchdogSec=180: the agent must ping although it is not the unit's main pid."""
    first = container.prop("WatchdogTimestampMonotonic")
    wait_for(
        "a WATCHDOG=1 ping",
        lambda: container.prop("WatchdogTimestampMonotonic") != first,
        100,
    )


def test_plugin_runs_in_the_unit(container: Container) -> None:
    wait_for(
        "the plugin's detached grandchild",
        lambda: container.processes(f"sleep {PLUGIN_MARK}"),
        120,
    )


def _memory_controller_writable(container: Container) -> bool:
    """False where the container gets the v1 memory controller read-only, as systemd-nspawn
    mounts it on a v1 host unless ContainerCgroups could delegate the host's: no memory limit
    can apply inside then."""
    for line in container.sh("cat /proc/self/mountinfo").stdout.splitlines():
        head, _, tail = line.partition(" - ")
        fields = head.split()
        if tail.startswith("cgroup2 "):
            continue
        if tail.startswith("cgroup ") and "memory" in tail.split()[2].split(","):
            return "ro" not in fields[5].split(",")
    return True  # v2: memory.max is the unified hierarchy's


def _memory_limit(container: Container, pid: str) -> int:
    """The memory limit of a process's cgroup, read from the cgroup files (v1 or v2)."""
    lines = container.sh(f"cat /proc/{pid}/cgroup").stdout.splitlines()
    v1 = [line.split(":", 2)[2] for line in lines if "memory" in line.split(":")[1].split(",")]
    if v1:
        path = f"/sys/fs/cgroup/memory{v1[0].rstrip('/')}/memory.limit_in_bytes"
    else:
        v2 = next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))
        path = f"/sys/fs/cgroup{v2.rstrip('/')}/memory.max"
    return int(container.sh(f"cat {path}").stdout)


def test_the_plugin_and_its_setsid_grandchild_are_in_the_plugins_cgroup(
    container: Container,
) -> None:
    test_plugin_runs_in_the_unit(container)
    grandchild = container.processes(f"sleep {PLUGIN_MARK}")[0].split()[0]
    cgroups = container.sh(f"cat /proc/{grandchild}/cgroup").stdout
    assert "/elkeid-agent.service/elkeid-plugins/stubborn" in cgroups, cgroups
    out = container.sh("/etc/elkeid/elkeid-agent ctl status").stdout
    assert "plugin limits " in out, out


def test_memory_limits_read_back_from_the_cgroup_files(container: Container) -> None:
    """The unit's MemoryMax=250M on the agent, the default 200 MiB on the plugin's cgroup."""
    dropins = "/etc/systemd/system/elkeid-agent.service.d"
    assert container.sh(f"test -e {dropins}", check=False).returncode == 1
    assert container.prop("MemoryMax") == str(250 << 20)
    if not _memory_controller_writable(container):
        pytest.skip("the container's v1 memory hierarchy is read-only: see ContainerCgroups")
    assert _memory_limit(container, container.prop("MainPID")) == 250 << 20
    grandchild = container.processes(f"sleep {PLUGIN_MARK}")[0].split()[0]
    assert _memory_limit(container, grandchild) == 200 << 20


def test_a_systemd_before_231_gets_memory_limit_in_a_drop_in(container: Container) -> None:
    """This root has systemd 252 and no 219 exists here: postinst is run with a systemctl that
    says 219, and the drop-in it writes must be one systemd reads and applies."""
    shim = (
        "mkdir -p /run/shim && printf '#!/bin/sh\\n[ \"$1\" = --version ] && "
        "{ echo \"systemd 219\"; exit 0; }\\nexec /bin/systemctl \"$@\"\\n' "
        ">/run/shim/systemctl && chmod +x /run/shim/systemctl"
    )
    container.sh(shim)
    # 219 ignores the unit's MemoryMax= (an unknown key); 252 does too once a runtime drop-in
    # sets it to infinity, so the limit read back below can only be the package's MemoryLimit=.
    as_219 = f"{UNIT_D}/as-219.conf"
    container.sh(f"mkdir -p {UNIT_D} && printf '[Service]\\nMemoryMax=infinity\\n' >{as_219}")
    pid = container.prop("MainPID")
    container.sh("PATH=/run/shim:$PATH /var/lib/dpkg/info/elkeid-agent.postinst configure 0.0.1")
    dropin = "/etc/systemd/system/elkeid-agent.service.d/elkeid-memory-limit.conf"
    assert "MemoryLimit=250M" in container.sh(f"cat {dropin}").stdout
    assert container.prop("MemoryLimit") == str(250 << 20)
    assert container.prop("MemoryMax") == "infinity"
    wait_for("restarted", lambda: container.prop("MainPID") not in ("0", pid), 180)
    wait_for("active again", lambda: container.prop("ActiveState") == "active", 180)
    writable = _memory_controller_writable(container)
    if writable:
        assert _memory_limit(container, container.prop("MainPID")) == 250 << 20
    container.sh(f"rm {as_219} && systemctl daemon-reload")
    # With the real systemctl (252) the drop-in goes again.
    container.sh("/var/lib/dpkg/info/elkeid-agent.postinst configure 0.0.1")
    assert container.sh(f"test -e {dropin}", check=False).returncode == 1
    assert container.prop("MemoryLimit") == "infinity"
    assert container.prop("MemoryMax") == str(250 << 20)
    wait_for("active again", lambda: container.prop("ActiveState") == "active", 180)
    if not writable:
        pytest.skip("the container's v1 memory hierarchy is read-only: limit not read back")


def test_plugin_environment_has_nothing_of_the_bundle(container: Container) -> None:
    """The agent's own environment has LD_LIBRARY_PATH, _PYI_*, STATICX_*; a plugin's
    (and so its children's) must not."""
    test_plugin_runs_in_the_unit(container)
    pid = container.processes(f"sleep {PLUGIN_MARK}")[0].split()[0]
    env = container.sh(f"tr '\\0' '\\n' < /proc/{pid}/environ").stdout.splitlines()
    names = {line.split("=", 1)[0] for line in env}
    leaked = {n for n in names if n.startswith(("_MEI", "_PYI", "STATICX_", "LD_LIBRARY_PATH"))}
    assert not leaked, env


def test_sigkill_brings_it_back_after_restartsec(
    container: Container, center: CenterThread
) -> None:
    pid = container.prop("MainPID")
    restarts = int(container.prop("NRestarts"))
    killed = time.monotonic()
    container.sh(f"kill -KILL {pid}")
    wait_for(
        "the restart",
        lambda: (
            container.prop("NRestarts") == str(restarts + 1)
            and container.prop("ActiveState") == "active"
        ),
        RESTART_SEC + 120,
    )
    assert time.monotonic() - killed >= RESTART_SEC - 1
    assert container.prop("MainPID") != pid
    center.clear()
    center.wait_records(1000, timeout=120)
    # The restarted agent removed the unpack dir the killed launcher left behind.
    left = container.sh("ls -A /etc/elkeid/tmp").stdout.split()
    assert len([n for n in left if n.startswith("staticx-")]) == 1, left


def test_stop_leaves_no_plugin_process(container: Container) -> None:
    test_plugin_runs_in_the_unit(container)
    container.sh(f"systemctl stop {UNIT}")
    assert container.processes(f"sleep {PLUGIN_MARK}") == []
    assert container.processes("elkeid-agent") == []
    # Stopped cleanly (SIGTERM through both launchers): no unpack dir left behind.
    assert container.sh("ls -A /etc/elkeid/tmp").stdout == ""


def test_purge_disables_and_removes_everything(container: Container) -> None:
    container.sh(f"systemctl start {UNIT}")
    container.sh("dpkg --purge elkeid-agent")
    assert container.prop("LoadState") == "not-found"
    assert container.sh("test -e /etc/elkeid", check=False).returncode == 1
    assert container.processes("elkeid-agent") == []
