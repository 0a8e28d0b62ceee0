"""The aarch64 build, made once per test session, and what its tests share.

`arm64_dist` runs `build/dist.sh arm64` (what `make dist ARCH=arm64` runs): it prepares
binfmt, the arm64 build root and the podman base image when missing (all cached under
build/cache/arm64/), builds under QEMU user emulation and packages. Only one build per
session: it takes minutes emulated (see docs/aarch64.md for measured times).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import BUILD_TIMEOUT_S, CACHE, REPO, TEST_VERSION, Arm64Dist, run_logged


def _dist(dist: Path, version: str, log: Path, seconds: float) -> Arm64Dist:
    return Arm64Dist(
        version=version,
        exe=dist / f"elkeid-agent-{version}-linux-arm64",
        deb=dist / f"elkeid-agent_{version}_arm64.deb",
        rpm=dist / f"elkeid-agent-{version}-1.aarch64.rpm",
        build_log=log,
        build_seconds=seconds,
    )


@pytest.fixture(scope="session")
def arm64_dist(tmp_path_factory: pytest.TempPathFactory) -> Arm64Dist:
    if os.geteuid() != 0:
        pytest.skip("the arm64 build needs root (binfmt_misc, debootstrap, podman, chroot)")
    prebuilt = os.environ.get("ELKEID_ARM64_DIST")
    if prebuilt:
        # Iterating on these tests: the output of an earlier `make dist ARCH=arm64`.
        exes = sorted(Path(prebuilt).glob("elkeid-agent-*-linux-arm64"))
        assert len(exes) == 1, f"ELKEID_ARM64_DIST={prebuilt}: want one executable, got {exes}"
        version = exes[0].name.removeprefix("elkeid-agent-").removesuffix("-linux-arm64")
        return _dist(Path(prebuilt), version, Path(prebuilt) / "build.log", 0.0)
    dist = tmp_path_factory.mktemp("arm64-dist")
    log = dist / "build.log"
    env = {**os.environ, "BUILD_VERSION": TEST_VERSION, "DIST_DIR": str(dist)}
    started = time.monotonic()
    run_logged([str(REPO / "build" / "dist.sh"), "arm64"], log, BUILD_TIMEOUT_S, env)
    seconds = time.monotonic() - started
    # Every CI run records its arm64 build time (docs/aarch64.md quotes them).
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "timings.log").open("a") as f:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        f.write(f"{stamp} pytest-dist {seconds:.0f}\n")
    return _dist(dist, TEST_VERSION, log, seconds)


@pytest.fixture(scope="session")
def arm64_min_root(arm64_dist: Arm64Dist) -> Path:
    """A pristine arm64 Debian 12 minbase root (no Python), made once and cached. After
    the build, whose preparation installed debootstrap and registered binfmt."""
    root = CACHE / "minroot"
    log = CACHE / "minroot-pytest.log"
    CACHE.mkdir(parents=True, exist_ok=True)
    run_logged([str(REPO / "build" / "mkroot.sh"), "bookworm", str(root), "arm64"], log, 20 * 60)
    return root


@pytest.fixture
def arm64_scratch_root(arm64_min_root: Path, tmp_path: Path) -> Iterator[Path]:
    """A throwaway copy of the minimal root, so a test's dpkg runs leave the cache clean."""
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(arm64_min_root), str(root)], check=True)
    yield root
    shutil.rmtree(root)
