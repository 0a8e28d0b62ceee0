"""The frozen executable on hosts without Python: Debian 12 and 11 minimal roots."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from elkeid_center.testing import CenterThread

from .conftest import REPO, Dist, cached_root, in_root, run

pytestmark = [pytest.mark.package, pytest.mark.timeout(1800)]

MIN_ROOTS = ["bookworm", "bullseye"]
BUILD_ROOT = REPO / "build" / "cache" / "roots" / "bookworm-build-amd64"


@pytest.mark.parametrize("name", MIN_ROOTS)
def test_version_and_help_in_minimal_root(amd64_dist: Dist, name: str) -> None:
    root = cached_root(name)
    assert not (root / "usr" / "bin" / "python3").exists(), "the root must have no Python"
    bind = [f"{amd64_dist.dir}:/mnt/dist:ro"]
    exe = f"/mnt/dist/{amd64_dist.exe.name}"
    out = in_root(root, exe, "--version", binds=bind)
    assert out.stdout == f"{amd64_dist.version}\n"
    helptext = in_root(root, exe, "--help", binds=bind).stdout
    for sub in ("run", "ctl"):
        assert sub in helptext
    ctl_help = in_root(root, exe, "ctl", "--help", binds=bind).stdout
    for sub in ("set", "start", "stop", "restart", "status", "enable", "disable", "cleanup"):
        assert sub in ctl_help


def _agent_toml(port: int) -> str:
    return f"""work_dir = "/work"

[tls]
ca = "/certs/ca.crt"
cert = "/certs/client.crt"
key = "/certs/client.key"
server_name = "elkeid.com"

[transport]
compression = "none"

[regions.default]
private = "127.0.0.1:{port}"
"""


@pytest.mark.parametrize("name", MIN_ROOTS)
def test_heartbeat_from_minimal_root(amd64_dist: Dist, name: str, tmp_path: Path) -> None:
    root = cached_root(name)
    work = tmp_path / "work"
    work.mkdir()
    with CenterThread(amd64_dist.certs) as center:
        (work / "agent.toml").write_text(_agent_toml(center.port))
        cmd = [
            str(REPO / "build" / "run-in-root.sh"),
            str(root),
            "--bind",
            f"{amd64_dist.dir}:/mnt/dist:ro",
            "--bind",
            f"{amd64_dist.certs}:/certs:ro",
            "--bind",
            f"{work}:/work",
            "--tmpfs",
            "/tmp:mode=1777",
            "--",
            "env",
            "TMPDIR=/work/tmp",
            f"/mnt/dist/{amd64_dist.exe.name}",
            "run",
            "--config",
            "/work/agent.toml",
        ]
        (work / "tmp").mkdir()
        # run-in-root.sh ends in exec: this pid becomes the agent's staticx launcher.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            beats = center.wait_records(1000, timeout=120)
            assert beats, "no heartbeat"
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
        assert proc.returncode == 0, out
    # SIGTERM reached the Python process through both launchers: they cleaned up.
    assert not [p.name for p in (work / "tmp").iterdir()], "unpack dirs left behind"


def test_elf_check_passes_and_has_teeth(amd64_dist: Dist) -> None:
    def check(name: str) -> subprocess.CompletedProcess[str]:
        return in_root(
            BUILD_ROOT,
            "/opt/elkeid-build/venv/bin/python",
            "/src/build/elfcheck.py",
            f"/mnt/dist/{name}",
            binds=[f"{REPO}:/src:ro", f"{amd64_dist.dir}:/mnt/dist:ro"],
            check=False,
        )

    shipped = check(amd64_dist.exe.name)
    assert shipped.returncode == 0, shipped.stdout + shipped.stderr
    assert f"OK: {amd64_dist.exe.name} needs nothing from the host's C library" in shipped.stdout
    assert "libpython3.11.so.1.0" in shipped.stdout
    assert "cygrpc" in shipped.stdout, "the PyInstaller archive inside was not inspected"
    # PyInstaller's output alone needs the build host's glibc: the check must say so.
    onefile = check(amd64_dist.onefile.name)
    assert onefile.returncode == 1, onefile.stdout + onefile.stderr
    assert "from the host, more than 2.17" in onefile.stdout


def test_noexec_tmp_does_not_stop_it(amd64_dist: Dist, tmp_path: Path) -> None:
    """/tmp mounted noexec (common hardening): with TMPDIR on an exec-capable dir, as the
    unit sets it (/etc/elkeid/tmp), the agent starts and nothing is unpacked under /tmp."""
    root = cached_root("bookworm")
    exe = f"/mnt/dist/{amd64_dist.exe.name}"
    (tmp_path / "tmp").mkdir(mode=0o700)
    script = (
        f"TMPDIR=/mnt/work/tmp {exe} --version && "
        f"TMPDIR=/mnt/work/tmp {exe} ctl --work-dir /mnt/work set --idc idc-noexec && "
        "cat /mnt/work/specified_env && "
        'test -z "$(ls -A /tmp)" && test -z "$(ls -A /mnt/work/tmp)" && '
        "mount | grep ' /tmp '"
    )
    out = in_root(
        root,
        "sh",
        "-c",
        script,
        binds=[f"{amd64_dist.dir}:/mnt/dist:ro", f"{tmp_path}:/mnt/work"],
        tmpfs=["/tmp:noexec,mode=1777"],
    )
    lines = out.stdout.splitlines()
    assert lines[0] == amd64_dist.version
    assert "specified_idc=idc-noexec" in lines
    assert "noexec" in lines[-1]


def test_bench_startup_runs(amd64_dist: Dist) -> None:
    out = run(
        [sys.executable, REPO / "bench" / "startup.py", "--exe", amd64_dist.exe, "--runs", "1"],
        timeout=600,
    )
    assert "size:" in out.stdout
    assert "frozen (staticx + onefile)" in out.stdout
