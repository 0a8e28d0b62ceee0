"""The x86-64 build, made once per test session, and the root filesystems its tests use.

`amd64_dist` runs `build/dist.sh amd64` (what `make dist` runs) into a temporary
DIST_DIR with a version of its own, then packages the same executable again as a higher
version for the upgrade tests. Root filesystems are made with build/mkroot.sh and
cached under build/cache/roots (about 40-80 s each the first time); tests that change a
root work on a copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTS = REPO / "build" / "cache" / "roots"
CERTS = REPO / "build" / "out" / "test-certs"
# Distinct from the source's version, so no test passes on a stale or unstamped build.
TEST_VERSION = "1.9.0.86"
UPGRADE_VERSION = "1.9.0.87"
# Fixed for the session's builds, so a rebuild must match byte for byte even when commits
# land in between (dist.sh's default is the last commit's time).
SOURCE_DATE_EPOCH = "1764000000"
# The port baked into build/product.default.toml: a package works with no config file.
PRODUCT_PORT = 6751
ROOT_SPECS = {
    "bookworm": ("bookworm", ""),
    "bullseye": ("bullseye", ""),
    "bookworm-systemd": ("bookworm", "systemd,dbus,systemd-sysv"),
}

@dataclass(frozen=True)
class Dist:
    version: str
    exe: Path
    onefile: Path
    deb: Path
    rpm: Path
    deb_upgrade: Path
    rpm_upgrade: Path
    certs: Path
    dir: Path
    source_date_epoch: str = SOURCE_DATE_EPOCH


def run(
    cmd: Sequence[str | os.PathLike[str]],
    timeout: float = 600,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure the assertion shows its output."""
    proc = subprocess.run(
        [str(c) for c in cmd],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if check:
        assert proc.returncode == 0, (
            f"{cmd} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


def in_root(
    root: Path,
    *cmd: str,
    binds: Sequence[str] = (),
    tmpfs: Sequence[str] = (),
    timeout: float = 300,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run cmd chrooted into root with /proc, /sys, /dev (build/run-in-root.sh).

    /tmp is a fresh tmpfs unless tmpfs names one: the executable unpacks there, and a
    cached root must not change while another test copies it.
    """
    args: list[str] = [str(REPO / "build" / "run-in-root.sh"), str(root)]
    for b in binds:
        args += ["--bind", b]
    if not any(t.split(":", 1)[0] == "/tmp" for t in tmpfs):
        tmpfs = [*tmpfs, "/tmp:mode=1777"]
    for t in tmpfs:
        args += ["--tmpfs", t]
    return run([*args, "--", *cmd], timeout=timeout, check=check)


@pytest.fixture(scope="session")
def host_ready() -> None:
    if os.geteuid() != 0:
        pytest.skip("packaging tests need root (chroot, mounts, debootstrap, dpkg --root)")
    # What `make test` already ran before collection; here for a direct pytest run.
    run([REPO / "tools" / "host-tools.sh", "test"], timeout=1800)


@pytest.fixture(scope="session")
def amd64_dist(host_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Dist:
    out = tmp_path_factory.mktemp("amd64-dist")
    env = {
        **os.environ,
        "BUILD_VERSION": TEST_VERSION,
        "DIST_DIR": str(out),
        "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH,
    }
    started = time.monotonic()
    run([REPO / "build" / "dist.sh", "amd64"], timeout=1800, env=env)
    seconds = time.monotonic() - started
    # build/out/amd64 is shared with every later build (other sessions too): keep a copy.
    onefile = out / "elkeid-agent.onefile"
    shutil.copy2(REPO / "build" / "out" / "amd64" / "elkeid-agent.onefile", onefile)
    exe = out / f"elkeid-agent-{TEST_VERSION}-linux-amd64"
    # The same executable as a higher package version: what dpkg/rpm upgrades exercise.
    run([REPO / "build" / "package.sh", "amd64", exe, UPGRADE_VERSION, CERTS, out])
    (out / "build-seconds").write_text(f"{seconds:.0f}\n")
    return Dist(
        version=TEST_VERSION,
        exe=exe,
        onefile=onefile,
        deb=out / f"elkeid-agent_{TEST_VERSION}_amd64.deb",
        rpm=out / f"elkeid-agent-{TEST_VERSION}-1.x86_64.rpm",
        deb_upgrade=out / f"elkeid-agent_{UPGRADE_VERSION}_amd64.deb",
        rpm_upgrade=out / f"elkeid-agent-{UPGRADE_VERSION}-1.x86_64.rpm",
        certs=CERTS,
        dir=out,
    )


def cached_root(name: str) -> Path:
    """A pristine root from ROOT_SPECS, made once (build/mkroot.sh) and reused."""
    suite, include = ROOT_SPECS[name]
    root = ROOTS / f"{name}-min-amd64" if not include else ROOTS / f"{name}-amd64"
    run([REPO / "build" / "mkroot.sh", suite, root, "amd64", include], timeout=900)
    return root


def copy_root(name: str, dest: Path) -> Path:
    """A private copy of a cached root, for tests that install into it."""
    src = cached_root(name)
    dest.mkdir()
    # Without /tmp's contents: another session's test may be unpacking there right now.
    run(
        ["sh", "-c", f"tar -C '{src}' --exclude='./tmp/*' -cf - . | tar -C '{dest}' -xf -"],
        timeout=600,
    )
    return dest


RootCopy = Callable[[str], Path]


@pytest.fixture
def root_copy(host_ready: None, tmp_path: Path) -> RootCopy:
    """make(name): a private copy of a cached root under this test's tmp_path."""

    def make(name: str) -> Path:
        return copy_root(name, tmp_path / f"root-{name}")

    return make
