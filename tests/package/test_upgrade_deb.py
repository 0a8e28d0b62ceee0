"""The self-upgrade's deb path under a real systemd (a Debian 12 root booted with
systemd-nspawn, as in test_systemd.py): version A, installed from its deb, receives a Config
for version B's deb from the local center, probes B's executable, runs `dpkg -i` in a scope
of its own, the maintainer script restarts the service, B confirms. `dpkg -l` shows B and
the service runs B; the saved previous executable is A.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from elkeid_center.testing import CenterThread

from .conftest import REPO, Dist, cached_root, run
from .test_systemd import Container, wait_for

pytestmark = [pytest.mark.package, pytest.mark.timeout(3600)]

# Above the session's TEST_VERSION (A) and its UPGRADE_VERSION repackaging.
B_VERSION = "1.9.0.88"
# Under CPUQuota=10 % every start of the staticx executable takes ~10 s, and the upgrade
# starts it three times (A, B's probe, B).
UPGRADE_TIMEOUT = 420


@pytest.fixture(scope="module")
def b_deb(amd64_dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Version B: a real build whose executable says B (`make dist` with BUILD_VERSION)."""
    out = tmp_path_factory.mktemp("upgrade-b-dist")
    env = {**os.environ, "BUILD_VERSION": B_VERSION, "DIST_DIR": str(out)}
    run([REPO / "build" / "dist.sh", "amd64"], timeout=1800, env=env)
    return out / f"elkeid-agent_{B_VERSION}_amd64.deb"


@pytest.fixture(scope="module")
def center(
    amd64_dist: Dist, b_deb: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CenterThread]:
    files = tmp_path_factory.mktemp("upgrade-files")
    shutil.copy(b_deb, files / b_deb.name)
    # A port of its own (not the product's 6751): other package tests may hold that one.
    with CenterThread(amd64_dist.certs, files_dir=files) as c:
        c.set_configs([{
            "name": "elkeid-agent",
            "version": B_VERSION,
            "sha256": hashlib.sha256(b_deb.read_bytes()).hexdigest(),
            "download_urls": [c.file_url(b_deb.name)],
        }])
        yield c


@pytest.fixture(scope="module")
def container(amd64_dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    if shutil.which("systemd-nspawn") is None:
        pytest.skip("systemd-nspawn is missing")
    log = tmp_path_factory.mktemp("nspawn-upgrade") / "console.log"
    c = Container(cached_root("bookworm-systemd"), amd64_dist.dir, log)
    try:
        yield c
    finally:
        c.close()


def test_deb_installed_agent_upgrades_itself_to_b(
    container: Container, center: CenterThread, amd64_dist: Dist
) -> None:
    a_version = amd64_dist.version
    # The host's config file (kept by dpkg: not in the package) points both versions at
    # this center; a short heartbeat interval makes B confirm sooner.
    container.sh(
        "mkdir -p /etc/elkeid && printf '%s\\n' '[transport]' 'heartbeat_interval = 5.0' "
        f"'[regions.default]' 'private = \"{center.address}\"' > /etc/elkeid/elkeid-agent.toml"
    )
    container.sh(f"dpkg -i /mnt/dist/{amd64_dist.deb.name}")
    wait_for("A active", lambda: container.prop("ActiveState") == "active", 180)
    first_pid = container.prop("MainPID")

    def dpkg_version() -> str:
        return container.sh("dpkg-query -W -f='${Version}' elkeid-agent").stdout.strip()

    wait_for("dpkg lists B", lambda: dpkg_version() == f"3:{B_VERSION}-1", UPGRADE_TIMEOUT)
    wait_for(
        "B's heartbeat says confirmed",
        lambda: any(r.fields.get("upgrade_state") == "confirmed" for r in center.records(1000)),
        UPGRADE_TIMEOUT,
    )
    assert center.packaged()[-1][1].version == B_VERSION
    results = [r.fields for r in center.records(5100) if r.fields["token"] == "upgrade"]
    assert any(f"upgraded from {a_version} to {B_VERSION}" in r["msg"] for r in results)
    # The service runs B, started by the maintainer script's restart.
    assert container.prop("ActiveState") == "active"
    assert container.prop("MainPID") != first_pid
    env = "TMPDIR=/etc/elkeid/tmp"
    assert container.sh(f"{env} /etc/elkeid/elkeid-agent --version").stdout.strip() == B_VERSION
    assert container.sh(f"{env} /etc/elkeid/elkeid-agent.prev --version").stdout.strip() == (
        a_version
    )
    assert container.sh("test -e /etc/elkeid/upgrade.json", check=False).returncode == 1
    listing = container.sh("dpkg -l elkeid-agent").stdout
    assert f"3:{B_VERSION}-1" in listing
    assert listing.splitlines()[-1].startswith("ii")
