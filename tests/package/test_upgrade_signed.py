"""Acceptance (issue 21), package tier: the frozen build with a publisher key baked in
through PRODUCT_CONFIG (so the signing policy is enforce by default), packaged and signed by
`make dist` (SIGNING_KEY), installed from its signed deb under systemd in nspawn. Pushed by
the local center, in order: B's deb without its signature, then B's signed deb changed after
signing (same sha256 as served): both refused before any probe runs (5100, state_detail,
the `signature_refused` counter), A keeps running; then B's signed deb: swapped in by dpkg
and confirmed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from elkeid_center.testing import CenterThread

from .conftest import CERTS, REPO, cached_root, run
from .test_systemd import Container, wait_for

pytestmark = [pytest.mark.package, pytest.mark.timeout(5400)]

A_VERSION = "1.9.0.90"
B_VERSION = "1.9.0.91"
UPGRADE_TIMEOUT = 420
REFUSAL_TIMEOUT = 240


#: Test-only: a directory where an earlier session of this module left its builds (two
#: `make dist` runs, 10+ minutes each), reused as they are; otherwise built in this session.
REUSE_ENV = "ELKEID_TEST_SIGNED_DIST"


@pytest.fixture(scope="module")
def builds(host_ready: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A's and B's signed debs, from two real builds with the key pinned at build time."""
    reuse = os.environ.get(REUSE_ENV)
    top = Path(reuse) if reuse else tmp_path_factory.mktemp("signed-dist")
    keys = top / "keys"
    if not (keys / "release.pub").exists():
        keys.mkdir(exist_ok=True)
        gen = run([sys.executable, REPO / "tools" / "sign.py", "keygen", keys / "release"])
        (keys / "product.toml").write_text(
            (REPO / "build" / "product.default.toml").read_text() + "\n"
            + gen.stdout.split("\n", 1)[1])
    debs = {}
    for version in (A_VERSION, B_VERSION):
        out = top / version
        signed = out / "signed"
        debs[version] = signed / f"elkeid-agent_{version}_amd64.deb"
        if not debs[version].exists():
            out.mkdir(exist_ok=True)
            env = {**os.environ, "BUILD_VERSION": version, "DIST_DIR": str(out),
                   "PRODUCT_CONFIG": str(keys / "product.toml"),
                   "SIGNING_KEY": str(keys / "release.key")}
            run([REPO / "build" / "dist.sh", "amd64"], timeout=2400, env=env)
        verify = [sys.executable, REPO / "tools" / "sign.py", "verify", "--pub",
                  keys / "release.pub", "--name", "elkeid-agent", "--version", version]
        for name in (debs[version].name, f"elkeid-agent-{version}-1.x86_64.rpm",
                     f"elkeid-agent-{version}-linux-amd64"):
            run([*verify, signed / name])
            # DIST_DIR keeps the files as built, for installing by hand.
            assert "unsigned" in run([*verify, out / name], check=False).stderr
        if version == A_VERSION:
            # The signed executable still runs (ELF tolerates trailing bytes; staticx and
            # PyInstaller find their archives regardless).
            exe = signed / f"elkeid-agent-{version}-linux-amd64"
            done = run([exe, "--version"], env={**os.environ, "TMPDIR": str(out)})
            assert done.stdout.strip() == version
    return debs


@pytest.fixture(scope="module")
def container(builds: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Container]:
    if shutil.which("systemd-nspawn") is None:
        pytest.skip("systemd-nspawn is missing")
    log = tmp_path_factory.mktemp("nspawn-signed") / "console.log"
    c = Container(cached_root("bookworm-systemd"), builds[A_VERSION].parent, log)
    try:
        yield c
    finally:
        c.close()


def _upgrade_results(center: CenterThread) -> list[str]:
    return [r.fields["msg"] for r in center.records(5100) if r.fields["token"] == "upgrade"]


def test_signed_upgrade_in_the_frozen_build(
    container: Container, builds: dict[str, Path], tmp_path: Path
) -> None:
    signed_b = builds[B_VERSION]
    files = tmp_path / "files"
    files.mkdir()
    data = signed_b.read_bytes()
    block = run([sys.executable, "-c",
                 "import sys; from pathlib import Path; "
                 "from elkeid_agent.signing.check import read_block; "
                 "print(read_block(Path(sys.argv[1])).content_size)", signed_b]).stdout
    unsigned = data[: int(block)]
    middle = len(unsigned) // 2
    tampered = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
    for name, body in (("unsigned.deb", unsigned), ("tampered.deb", tampered),
                       ("signed.deb", data)):
        (files / name).write_bytes(body)

    def config(name: str) -> dict[str, object]:
        return {"name": "elkeid-agent", "version": B_VERSION,
                "sha256": hashlib.sha256((files / name).read_bytes()).hexdigest(),
                "download_urls": [center.file_url(name)]}

    with CenterThread(CERTS, files_dir=files) as center:
        container.sh(
            "mkdir -p /etc/elkeid && printf '%s\\n' '[transport]' 'heartbeat_interval = 5.0' "
            f"'[regions.default]' 'private = \"{center.address}\"' > /etc/elkeid/elkeid-agent.toml"
        )
        # The signed deb installs as it is: dpkg ignores the block after its last member.
        container.sh(f"dpkg -i /mnt/dist/{builds[A_VERSION].name}")
        wait_for("A active", lambda: container.prop("ActiveState") == "active", 180)
        wait_for("A connected", lambda: center.records(1000), 180)
        agent_log = "/etc/elkeid/log/elkeid-agent.log"
        assert "signing policy enforce, 1 pinned key(s)" in container.sh(f"cat {agent_log}").stdout
        first_pid = container.prop("MainPID")

        for name, reason in (("unsigned.deb", "signature: unsigned; refused"),
                             ("tampered.deb", "(changed after signing); refused")):
            center.set_configs([config(name)])
            center.send_configs([config(name)])
            wait_for(f"{name} refused",
                     lambda r=reason: any(r in m for m in _upgrade_results(center)),
                     REFUSAL_TIMEOUT)
        log = container.sh(f"cat {agent_log}").stdout
        assert "probing" not in log  # neither reached the --version probe
        assert container.prop("MainPID") == first_pid  # A kept running
        wait_for("the refusals counted in a heartbeat", lambda: any(
            int(r.fields.get("signature_refused", 0)) >= 2 and "signature" in
            r.fields.get("state_detail", "") for r in center.records(1000)), 60)

        center.set_configs([config("signed.deb")])
        center.send_configs([config("signed.deb")])

        def dpkg_version() -> str:
            return container.sh("dpkg-query -W -f='${Version}' elkeid-agent").stdout.strip()

        wait_for("dpkg lists B", lambda: dpkg_version() == f"3:{B_VERSION}-1", UPGRADE_TIMEOUT)
        wait_for("B confirmed", lambda: any(
            f"upgraded from {A_VERSION} to {B_VERSION}" in m for m in _upgrade_results(center)),
            UPGRADE_TIMEOUT)
        env = "TMPDIR=/etc/elkeid/tmp"
        assert container.sh(f"{env} /etc/elkeid/elkeid-agent --version").stdout.strip() == (
            B_VERSION)
        assert container.sh("test -e /etc/elkeid/upgrade.json", check=False).returncode == 1
