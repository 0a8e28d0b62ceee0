"""The aarch64 executable and packages (issue 5), built once per session by `arm64_dist`
and run under QEMU user emulation (binfmt_misc) on the x86-64 CI machine."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from elkeid_center.testing import CenterThread, DecodedRecord

from .support import BUILD_TIMEOUT_S, CACHE, REPO, Arm64Dist, ensure_host_tool, run_logged

# Every test may be the one whose setup runs the session's build.
pytestmark = [pytest.mark.arm64, pytest.mark.timeout(BUILD_TIMEOUT_S + 15 * 60)]

# Under emulation a staticx + onefile start unpacks ~75 MB through QEMU: seconds, not ms.
EMULATED_START_S = 120.0
FAST = {"heartbeat_interval": 0.5, "dial_timeout": 2.0, "backoff_initial": 0.5, "backoff_max": 2.0}


def run(cmd: list[str], timeout: float = EMULATED_START_S, **env: str) -> str:
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, f"{cmd} exited {result.returncode}: {result.stderr}"
    return result.stdout


def test_file_says_arm_aarch64_static(arm64_dist: Arm64Dist) -> None:
    ensure_host_tool("file", "file")
    described = run(["file", "-b", str(arm64_dist.exe)])
    assert "ARM aarch64" in described
    # staticx's output: nothing is taken from the host's loader or libc.
    assert "statically linked" in described


@pytest.fixture(scope="session")
def elfcheck_python() -> Path:
    """A host venv with what build/elfcheck.py reads ELFs and archives with (pyelftools,
    PyInstaller's archive reader), so the check runs independently of the build root."""
    venv = CACHE / "check-venv"
    python = venv / "bin" / "python"
    stamp = venv / ".stamp"
    pins = (REPO / "constraints.txt").read_text()
    if not python.exists() or not stamp.exists() or stamp.read_text() != pins:
        log = CACHE / "check-venv.log"
        run_logged([sys.executable, "-m", "venv", "--clear", str(venv)], log, 120)
        # The host's PIP_FIND_LINKS names a host-only wheel directory; keep pip to the index.
        env = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"}
        run_logged(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "-c",
                str(REPO / "constraints.txt"),
                "pyelftools",
                "pyinstaller",
            ],
            log,
            600,
            env,
        )
        stamp.write_text(pins)
    return python


def test_elf_check_passes(arm64_dist: Arm64Dist, elfcheck_python: Path) -> None:
    report = run([str(elfcheck_python), str(REPO / "build" / "elfcheck.py"), str(arm64_dist.exe)])
    assert report.splitlines()[-1].startswith("OK:"), report
    assert "AArch64" in report or "aarch64" in report.lower(), report


def test_version_under_qemu_user_emulation(arm64_dist: Arm64Dist, tmp_path: Path) -> None:
    if platform.machine() == "x86_64":
        # binfmt_misc hands the aarch64 executable to qemu-aarch64; prepare registered it.
        assert Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists()
    out = run([str(arm64_dist.exe), "--version"], TMPDIR=str(tmp_path))
    assert out == arm64_dist.version + "\n"


def test_heartbeat_reports_aarch64(
    arm64_dist: Arm64Dist,
    center: CenterThread,
    agent_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    config = agent_config(transport=FAST)
    unpack = tmp_path / "unpack"
    unpack.mkdir()
    # A file rather than a pipe: nothing reads it while the agent runs.
    stderr_path = tmp_path / "agent.stderr"
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [str(arm64_dist.exe), "run", "--config", str(config)],
            env={**os.environ, "TMPDIR": str(unpack)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )

    def heartbeats() -> list[DecodedRecord]:
        if proc.poll() is not None:
            tail = stderr_path.read_text(errors="replace")[-4000:]
            pytest.fail(f"the agent exited {proc.returncode} before a heartbeat:\n{tail}")
        return center.records(1000)

    try:
        beat = center.wait_for(heartbeats, timeout=EMULATED_START_S)[0]
        assert beat.fields["arch"] == "aarch64"
        header = center.packaged()[0].decoded
        assert header.version == arm64_dist.version
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def in_root(root: Path, *cmd: str, binds: tuple[str, ...] = ()) -> str:
    """A command in an arm64 root through the shared build/run-in-root.sh (binfmt runs
    its aarch64 binaries)."""
    args = [str(REPO / "build" / "run-in-root.sh"), str(root)]
    for bind in binds:
        args += ["--bind", bind]
    return run([*args, "--", *cmd], timeout=600)


def test_deb_installs_and_runs_in_arm64_root(
    arm64_dist: Arm64Dist, arm64_scratch_root: Path
) -> None:
    root = arm64_scratch_root
    assert run(["chroot", str(root), "uname", "-m"]) == "aarch64\n"
    in_root(
        root,
        "dpkg",
        "-i",
        f"/pkg/{arm64_dist.deb.name}",
        binds=(f"{arm64_dist.deb.parent}:/pkg:ro",),
    )
    status = in_root(
        root, "dpkg-query", "-W", "-f", "${Status} ${Version} ${Architecture}", "elkeid-agent"
    )
    assert status == f"install ok installed 3:{arm64_dist.version}-1 arm64"
    # Debian minbase has no Python: the executable brings everything it needs.
    assert not (root / "usr" / "bin" / "python3").exists()
    assert in_root(
        root, "env", "TMPDIR=/etc/elkeid/tmp", "/etc/elkeid/elkeid-agent", "--version"
    ) == (arm64_dist.version + "\n")


RPM_FILES = {
    "/etc/elkeid": "drwxr-xr-x",
    "/etc/elkeid/certs": "drwxr-xr-x",
    "/etc/elkeid/elkeid-agent": "-rwx------",
    "/etc/elkeid/certs/ca.crt": "-rw-r--r--",
    "/etc/elkeid/certs/client.crt": "-rw-r--r--",
    "/etc/elkeid/certs/client.key": "-rw-------",
    "/usr/lib/systemd/system/elkeid-agent.service": "-rw-r--r--",
    "/usr/share/doc/elkeid-agent/copyright": "-rw-r--r--",
}


def test_rpm_is_aarch64_with_the_right_paths(arm64_dist: Arm64Dist) -> None:
    ensure_host_tool("rpm", "rpm")
    rpm = str(arm64_dist.rpm)
    assert run(["rpm", "-qp", "--qf", "%{ARCH} %{EPOCH}:%{VERSION}", rpm]) == (
        f"aarch64 3:{arm64_dist.version}"
    )
    listed = run(
        ["rpm", "-qp", "--qf", "[%{FILEMODES:perms} %{FILEUSERNAME} %{FILENAMES}\\n]", rpm]
    )
    files = {}
    for line in listed.splitlines():
        mode, owner, path = line.split(" ", 2)
        assert owner == "root", line
        files[path] = mode
    assert files == RPM_FILES


def test_packaging_refuses_a_foreign_machine(arm64_dist: Arm64Dist, tmp_path: Path) -> None:
    """nFPM packs any file as any architecture; build/package.sh must check the ELF."""
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("ca.crt", "client.crt", "client.key"):
        (certs / name).write_text("placeholder\n")
    result = subprocess.run(
        [
            str(REPO / "build" / "package.sh"),
            "amd64",
            str(arm64_dist.exe),
            arm64_dist.version,
            str(certs),
            str(tmp_path / "dist"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "refusing" in result.stderr
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())
