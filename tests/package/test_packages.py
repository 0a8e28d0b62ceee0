"""deb and rpm: exact contents, install, upgrade, removal, in Debian roots."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from .conftest import REPO, UPGRADE_VERSION, Dist, RootCopy, in_root, run

pytestmark = [pytest.mark.package, pytest.mark.timeout(1800)]

# (mode, owner/group, path) as `dpkg-deb -c` shows them; nFPM adds the parents.
DEB_CONTENTS = [
    ("drwxr-xr-x", "root/root", "./etc/"),
    ("drwxr-xr-x", "root/root", "./etc/elkeid/"),
    ("drwxr-xr-x", "root/root", "./etc/elkeid/certs/"),
    ("-rw-r--r--", "root/root", "./etc/elkeid/certs/ca.crt"),
    ("-rw-r--r--", "root/root", "./etc/elkeid/certs/client.crt"),
    ("-rw-------", "root/root", "./etc/elkeid/certs/client.key"),
    ("-rwx------", "root/root", "./etc/elkeid/elkeid-agent"),
    ("drwxr-xr-x", "root/root", "./lib/"),
    ("drwxr-xr-x", "root/root", "./lib/systemd/"),
    ("drwxr-xr-x", "root/root", "./lib/systemd/system/"),
    ("-rw-r--r--", "root/root", "./lib/systemd/system/elkeid-agent.service"),
    ("drwxr-xr-x", "root/root", "./usr/"),
    ("drwxr-xr-x", "root/root", "./usr/share/"),
    ("drwxr-xr-x", "root/root", "./usr/share/doc/"),
    ("drwxr-xr-x", "root/root", "./usr/share/doc/elkeid-agent/"),
    ("-rw-r--r--", "root/root", "./usr/share/doc/elkeid-agent/changelog.Debian.gz"),
    ("-rw-r--r--", "root/root", "./usr/share/doc/elkeid-agent/copyright"),
    ("drwxr-xr-x", "root/root", "./usr/share/lintian/"),
    ("drwxr-xr-x", "root/root", "./usr/share/lintian/overrides/"),
    ("-rw-r--r--", "root/root", "./usr/share/lintian/overrides/elkeid-agent"),
]
# rpm owns only what it lists: /usr/lib/systemd/system belongs to systemd.
RPM_CONTENTS = [
    ("drwxr-xr-x", "root", "root", "/etc/elkeid"),
    ("drwxr-xr-x", "root", "root", "/etc/elkeid/certs"),
    ("-rw-r--r--", "root", "root", "/etc/elkeid/certs/ca.crt"),
    ("-rw-r--r--", "root", "root", "/etc/elkeid/certs/client.crt"),
    ("-rw-------", "root", "root", "/etc/elkeid/certs/client.key"),
    ("-rwx------", "root", "root", "/etc/elkeid/elkeid-agent"),
    ("-rw-r--r--", "root", "root", "/usr/lib/systemd/system/elkeid-agent.service"),
    ("-rw-r--r--", "root", "root", "/usr/share/doc/elkeid-agent/copyright"),
]
UNIT = "lib/systemd/system/elkeid-agent.service"
# Where the Go agent's elkeidctl put its unit.
GO_UNIT = "etc/systemd/system/elkeid-agent.service"
# What a running agent leaves in its work dir; purge/erase must take all of it.
STATE = [
    "machine-id",
    "specified_env",
    "status.json",
    "plugin/p/p.bin",
    "log/agent.log",
    "tmp/staticx-abc/x",
]


def test_deb_lists_exactly_the_expected_contents(amd64_dist: Dist) -> None:
    listing = run(["dpkg-deb", "-c", amd64_dist.deb]).stdout.splitlines()
    assert [(f[0], f[1], f[5]) for f in (line.split() for line in listing)] == DEB_CONTENTS
    size = next(int(line.split()[2]) for line in listing if line.endswith("/elkeid-agent"))
    assert size == amd64_dist.exe.stat().st_size
    fields = run(["dpkg-deb", "-f", amd64_dist.deb, "Package", "Version", "Architecture"])
    assert fields.stdout.split("\n")[:3] == [
        "Package: elkeid-agent",
        f"Version: 3:{amd64_dist.version}-1",
        "Architecture: amd64",
    ]
    # gzip members: Debian 11's dpkg cannot read zstd ones.
    members = run(["ar", "t", amd64_dist.deb]).stdout.split()
    assert members == ["debian-binary", "control.tar.gz", "data.tar.gz"]


def test_rpm_lists_exactly_the_expected_contents(amd64_dist: Dist) -> None:
    listing = run(["rpm", "-qlvp", amd64_dist.rpm]).stdout.splitlines()
    assert [(f[0], f[2], f[3], f[-1]) for f in (line.split() for line in listing)] == (RPM_CONTENTS)
    info = run(
        [
            "rpm",
            "-qp",
            "--qf",
            "%{NAME} %{EPOCH} %{VERSION} %{ARCH} %{PAYLOADCOMPRESSOR}",
            amd64_dist.rpm,
        ]
    ).stdout
    assert info == f"elkeid-agent 3 {amd64_dist.version} x86_64 gzip"


def test_lintian_passes_the_deb(amd64_dist: Dist) -> None:
    """Every tag fixed or overridden with its reason (deploy/deb/lintian-overrides)."""
    out = run(
        ["lintian", "--tag-display-limit", "0", "--fail-on", "error,warning", amd64_dist.deb],
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout == ""


def test_rpmlint_passes_the_rpm(amd64_dist: Dist) -> None:
    """Every check fixed or filtered with its reason (deploy/rpm/rpmlint.toml)."""
    out = run(["rpmlint", "-c", REPO / "deploy/rpm/rpmlint.toml", amd64_dist.rpm], check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 errors, 0 warnings, 0 badness" in out.stdout, out.stdout


def test_packaging_refuses_an_executable_of_another_architecture(
    amd64_dist: Dist, tmp_path: Path
) -> None:
    out = run(
        [
            REPO / "build" / "package.sh",
            "arm64",
            amd64_dist.exe,
            "9.9.9",
            amd64_dist.certs,
            tmp_path,
        ],
        check=False,
    )
    assert out.returncode == 1
    assert "not a 64-bit ELF for arm64" in out.stderr
    assert not list(tmp_path.iterdir())


def _make_state(root: Path) -> None:
    for rel in STATE:
        path = root / "etc" / "elkeid" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("state\n")


@pytest.mark.parametrize("name", ["bookworm", "bullseye"])
def test_deb_installs_upgrades_and_purges(amd64_dist: Dist, root_copy: RootCopy, name: str) -> None:
    root = root_copy(name)
    bind = [f"{amd64_dist.dir}:/mnt/dist:ro"]
    deb = f"/mnt/dist/{amd64_dist.deb.name}"
    out = in_root(root, "dpkg", "-i", deb, binds=bind)
    # No systemd runs in a chroot: the scripts say so instead of failing.
    assert "systemd is not running here" in out.stderr
    agent = root / "etc" / "elkeid" / "elkeid-agent"
    assert agent.stat().st_mode & 0o777 == 0o700
    assert (root / "etc/elkeid/certs/client.key").stat().st_mode & 0o777 == 0o600
    assert (root / "etc/elkeid/tmp").is_dir()
    assert in_root(root, "/etc/elkeid/elkeid-agent", "--version").stdout.strip() == (
        amd64_dist.version
    )

    in_root(root, "dpkg", "-i", f"/mnt/dist/{amd64_dist.deb_upgrade.name}", binds=bind)
    status = in_root(root, "dpkg-query", "-W", "-f", "${Version} ${Status}", "elkeid-agent")
    assert status.stdout == f"3:{UPGRADE_VERSION}-1 install ok installed"

    # remove keeps the host's identity and settings; purge takes everything.
    _make_state(root)
    in_root(root, "dpkg", "-r", "elkeid-agent")
    assert not agent.exists()
    assert (root / "etc/elkeid/machine-id").is_file()
    assert not (root / "etc/elkeid/tmp").exists()
    in_root(root, "dpkg", "-P", "elkeid-agent")
    assert not (root / "etc" / "elkeid").exists()
    assert not (root / UNIT).exists()
    listed = in_root(root, "dpkg-query", "-W", "elkeid-agent", check=False)
    assert listed.returncode != 0


def test_rpm_installs_upgrades_and_erases(amd64_dist: Dist, root_copy: RootCopy) -> None:
    root = root_copy("bookworm")
    # rpm --root runs the scriptlets chrooted into root, with its /bin/sh.
    rpm = ["rpm", "--root", str(root), "--nodeps"]
    run(["rpm", "--root", root, "--initdb"])
    out = run([*rpm, "-i", amd64_dist.rpm])
    assert "systemd is not running here" in out.stderr
    assert (root / "etc/elkeid/elkeid-agent").stat().st_mode & 0o777 == 0o700
    query = run(["rpm", "--root", root, "-q", "--qf", "%{EPOCH}:%{VERSION}", "elkeid-agent"])
    assert query.stdout == f"3:{amd64_dist.version}"
    run([*rpm, "-U", amd64_dist.rpm_upgrade])
    query = run(["rpm", "--root", root, "-q", "--qf", "%{EPOCH}:%{VERSION}", "elkeid-agent"])
    assert query.stdout == f"3:{UPGRADE_VERSION}"
    assert (root / "etc/elkeid/elkeid-agent").is_file(), "upgrade's old-package scripts ran"
    _make_state(root)
    run([*rpm, "-e", "elkeid-agent"])
    assert not (root / "etc" / "elkeid").exists()
    assert not (root / "usr" / UNIT).exists()
    assert re.search(
        r"not installed", run(["rpm", "--root", root, "-q", "elkeid-agent"], check=False).stdout
    )


GO_NFPM = """\
name: elkeid-agent
arch: amd64
platform: linux
epoch: "3"
version: 1.7.0.0
release: "1"
maintainer: go <go@localhost>
description: stand-in for the Go agent's package
contents:
  - src: ./elkeid-agent
    dst: /etc/elkeid/elkeid-agent
    file_info: {mode: 0700}
  - src: ./elkeidctl
    dst: /etc/elkeid/elkeidctl
    file_info: {mode: 0700}
  - src: ./elkeid-agent.service
    dst: /etc/elkeid/elkeid-agent.service
    file_info: {mode: 0600}
scripts:
  postinstall: ./postinstall.sh
deb:
  compression: gzip
"""
# What the Go package's elkeidctl does at install: copy the unit where systemd looks and
# write the host's identity and settings.
GO_POSTINSTALL = """#!/bin/sh
mkdir -p /etc/systemd/system
cp /etc/elkeid/elkeid-agent.service /etc/systemd/system/elkeid-agent.service
echo specified_id=go-agent-id > /etc/elkeid/specified_env
echo 11111111-2222-3333-4444-555555555555 > /etc/elkeid/machine-id
"""


def test_deb_replaces_the_go_agent_package_in_place(
    amd64_dist: Dist, root_copy: RootCopy, tmp_path: Path
) -> None:
    stage = tmp_path / "go"
    stage.mkdir()
    (stage / "nfpm.yaml").write_text(GO_NFPM)
    (stage / "elkeid-agent").write_text("#!/bin/sh\necho 1.7.0.0\n")
    (stage / "elkeidctl").write_text("#!/bin/sh\n")
    (stage / "elkeid-agent.service").write_text("[Service]\nExecStart=/etc/elkeid/elkeid-agent\n")
    (stage / "postinstall.sh").write_text(GO_POSTINSTALL)
    go_deb = tmp_path / "elkeid-agent_1.7.0.0_amd64.deb"
    nfpm = REPO / "build" / "cache" / "tools" / "bin" / "nfpm"
    run(["sh", "-c", f"cd {stage} && {nfpm} package -p deb -f nfpm.yaml -t {go_deb}"])

    root = root_copy("bookworm")
    binds = [f"{amd64_dist.dir}:/mnt/dist:ro", f"{tmp_path}:/mnt/go:ro"]
    in_root(root, "dpkg", "-i", f"/mnt/go/{go_deb.name}", binds=binds)
    assert (root / GO_UNIT).is_file()

    out = in_root(root, "dpkg", "-i", f"/mnt/dist/{amd64_dist.deb.name}", binds=binds)
    assert "removed the Go agent's /etc/systemd/system/elkeid-agent.service" in out.stderr
    status = in_root(root, "dpkg-query", "-W", "-f", "${Version}", "elkeid-agent")
    assert status.stdout == f"3:{amd64_dist.version}-1"
    etc = root / "etc" / "elkeid"
    assert not (etc / "elkeidctl").exists()
    assert not (etc / "elkeid-agent.service").exists()
    # The unowned copy elkeidctl made would shadow the packaged unit: it is gone.
    assert not (root / GO_UNIT).exists()
    assert "Type=notify" in (root / UNIT).read_text()
    # The host keeps its identity and settings across the switch.
    assert (etc / "machine-id").read_text().startswith("11111111-")
    assert (etc / "specified_env").read_text() == "specified_id=go-agent-id\n"
    out = in_root(root, "/etc/elkeid/elkeid-agent", "--version")
    assert out.stdout.strip() == amd64_dist.version


def test_build_is_reproducible(amd64_dist: Dist, tmp_path: Path) -> None:
    """Same checkout, version and SOURCE_DATE_EPOCH: the same executable, deb and rpm,
    byte for byte."""
    env = {
        **os.environ,
        "BUILD_VERSION": amd64_dist.version,
        "DIST_DIR": str(tmp_path),
        "SOURCE_DATE_EPOCH": amd64_dist.source_date_epoch,
    }
    run([REPO / "build" / "dist.sh", "amd64"], timeout=1800, env=env)
    for artifact in (amd64_dist.exe, amd64_dist.deb, amd64_dist.rpm):
        again = tmp_path / artifact.name
        assert again.read_bytes() == artifact.read_bytes(), f"{artifact.name} differs"
