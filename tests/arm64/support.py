"""Constants and helpers of the aarch64 tests (a module of its own: test modules import
it, never a conftest)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "build" / "cache" / "arm64"
# Distinct from the source's version, so a test cannot pass on a stale or unstamped build.
TEST_VERSION = "1.9.0.64"
# A cold build (debootstrap, pip, staticx compiled under emulation) took ~12 min on a busy
# 2-core machine (docs/aarch64.md); the limit leaves room for a slower one without letting
# a hang eat the CI budget.
BUILD_TIMEOUT_S = 45 * 60


@dataclass(frozen=True)
class Arm64Dist:
    version: str
    exe: Path
    deb: Path
    rpm: Path
    build_log: Path
    build_seconds: float


def run_logged(
    cmd: list[str], log: Path, timeout: float, env: Mapping[str, str] | None = None
) -> None:
    """Run `cmd` in the repository with its output in `log`; a failure shows the log's tail."""
    with log.open("wb") as out:
        result = subprocess.run(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
            env=env,
            cwd=REPO,
        )
    if result.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        pytest.fail(f"{' '.join(cmd)} exited {result.returncode}:\n" + "\n".join(tail))


def ensure_host_tool(command: str, package: str) -> None:
    """A fresh CI machine has only the apt packages that project scripts install."""
    if shutil.which(command):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
    if subprocess.run(install, capture_output=True, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=True)
        subprocess.run(install, capture_output=True, env=env, check=True)
