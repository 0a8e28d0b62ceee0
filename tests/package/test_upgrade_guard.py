"""Candidates that pass `--version` but cannot run, under a real systemd with the deb
installed (a Debian 12 root booted with systemd-nspawn, as in test_upgrade_deb.py).

One container and one center for the module; the tests run in order on the state the
previous one left:

1. an impostor (answers `--version` as its version, exits 1 for anything else) packaged as
   a deb: refused by the selftest probe; A keeps running; the reason is in the heartbeat
   and a 5100;
2. a real build of this tree without uvloop (PyInstaller exclude through the test-only
   ELKEID_BUILD_EXCLUDE): its `--version` and the build's import smoke test pass, the
   selftest probe refuses it;
3. the selftest switched off (test-only ELKEID_TEST_SKIP_SELFTEST=1 in a drop-in): a third
   impostor deb is installed with dpkg; it dies at every start before any agent code runs;
   the unit's ExecStartPre guard, run from A's saved executable, counts the starts and
   restores A before the fourth; A connects and reports the rollback; `ctl status` says so.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from elkeid_center.testing import CenterThread

from .conftest import REPO, Dist, cached_root, run
from .test_systemd import Container, wait_for

pytestmark = [pytest.mark.package, pytest.mark.timeout(3600)]

IMPOSTOR_VERSION = "1.9.0.90"
NOMODULE_VERSION = "1.9.0.91"
GUARDED_VERSION = "1.9.0.92"
# Every start of the staticx executable takes ~10-15 s under CPUQuota=10 %; the guard case
# has 3 failed starts, each after the guard's own start, then A's start.
STEP_TIMEOUT = 600
ENV = "TMPDIR=/etc/elkeid/tmp"
IMPOSTOR = """#!/bin/sh
if [ "$1" = --version ]; then echo {version}; exit 0; fi
echo "impostor: not an agent" >&2
exit 1
"""


def repackage(deb: Path, executable: bytes, version: str, out: Path) -> Path:
    """`deb` with its executable replaced and its version changed (unit, certs and scripts
    stay): a package whose build broke while its packaging did not."""
    tree = out / f"tree-{version}"
    run(["dpkg-deb", "-R", deb, tree])
    target = tree / "etc" / "elkeid" / "elkeid-agent"
    target.write_bytes(executable)
    control = tree / "DEBIAN" / "control"
    control.write_text("".join(
        f"Version: 3:{version}-1\n" if line.startswith("Version:") else line
        for line in control.read_text().splitlines(keepends=True)
    ))
    sums = tree / "DEBIAN" / "md5sums"
    if sums.exists():
        sums.write_text("".join(
            f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.relative_to(tree)}\n"
            for p in sorted(tree.rglob("*")) if p.is_file() and "DEBIAN" not in p.parts
        ))
    built = out / f"elkeid-agent_{version}_amd64.deb"
    run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", tree, built])
    shutil.rmtree(tree)
    return built


@pytest.fixture(scope="module")
def debs(amd64_dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("guard-debs")
    nomodule = tmp_path_factory.mktemp("nomodule-dist")
    env = {**os.environ, "BUILD_VERSION": NOMODULE_VERSION, "DIST_DIR": str(nomodule),
           "ELKEID_BUILD_EXCLUDE": "uvloop"}
    run([REPO / "build" / "dist.sh", "amd64"], timeout=1800, env=env)
    return {
        IMPOSTOR_VERSION: repackage(amd64_dist.deb, IMPOSTOR.format(version=IMPOSTOR_VERSION)
                                    .encode(), IMPOSTOR_VERSION, out),
        NOMODULE_VERSION: nomodule / f"elkeid-agent_{NOMODULE_VERSION}_amd64.deb",
        GUARDED_VERSION: repackage(amd64_dist.deb, IMPOSTOR.format(version=GUARDED_VERSION)
                                   .encode(), GUARDED_VERSION, out),
    }


@pytest.fixture(scope="module")
def center(debs: dict[str, Path], amd64_dist: Dist,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[CenterThread]:
    files = tmp_path_factory.mktemp("guard-files")
    for deb in debs.values():
        shutil.copy(deb, files / deb.name)
    with CenterThread(amd64_dist.certs, files_dir=files) as c:
        yield c


@pytest.fixture(scope="module")
def container(amd64_dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    if shutil.which("systemd-nspawn") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("systemd-nspawn or dpkg-deb is missing")
    log = tmp_path_factory.mktemp("nspawn-guard") / "console.log"
    c = Container(cached_root("bookworm-systemd"), amd64_dist.dir, log)
    try:
        yield c
    finally:
        c.close()


def offer(center: CenterThread, debs: dict[str, Path], version: str) -> None:
    deb = debs[version]
    config: dict[str, Any] = {
        "name": "elkeid-agent", "version": version,
        "sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
        "download_urls": [center.file_url(deb.name)],
    }
    center.set_configs([config])
    center.send_configs([config])


def errors(center: CenterThread) -> list[str]:
    return [r.fields.get("upgrade_error", "") for r in center.records(1000)]


def upgrade_results(center: CenterThread) -> list[dict[str, str]]:
    return [r.fields for r in center.records(5100) if r.fields["token"] == "upgrade"]


def dpkg_version(container: Container) -> str:
    return container.sh("dpkg-query -W -f='${Version}' elkeid-agent").stdout.strip()


def assert_a_runs_unchanged(container: Container, amd64_dist: Dist, pid: str) -> None:
    assert dpkg_version(container) == f"3:{amd64_dist.version}-1"
    assert container.prop("ActiveState") == "active"
    assert container.prop("MainPID") == pid
    assert container.sh(f"{ENV} /etc/elkeid/elkeid-agent --version").stdout.strip() == (
        amd64_dist.version)
    assert container.sh("test -e /etc/elkeid/upgrade.json", check=False).returncode == 1


def test_impostor_deb_is_refused_by_the_selftest_probe(
    container: Container, center: CenterThread, amd64_dist: Dist, debs: dict[str, Path]
) -> None:
    # probe_timeout above the default: the shared test machine is slower than a host.
    container.sh(
        "mkdir -p /etc/elkeid && printf '%s\\n' '[transport]' 'heartbeat_interval = 5.0' "
        "'[upgrade]' 'probe_timeout = 150.0' "
        f"'[regions.default]' 'private = \"{center.address}\"' > /etc/elkeid/elkeid-agent.toml"
    )
    container.sh(f"dpkg -i /mnt/dist/{amd64_dist.deb.name}")
    wait_for("A active", lambda: container.prop("ActiveState") == "active", 180)
    wait_for("A streams", center.packaged, 180)
    pid = container.prop("MainPID")
    offer(center, debs, IMPOSTOR_VERSION)
    reason = "probe: selftest exited with 1 without an answer: impostor: not an agent"
    wait_for("the refusal in a heartbeat", lambda: any(reason in e for e in errors(center)),
             STEP_TIMEOUT)
    beat = next(r for r in center.records(1000) if reason in r.fields["upgrade_error"])
    assert beat.fields["upgrade_state"] == "idle"
    assert beat.fields["state"] == "abnormal"
    failed = [r for r in upgrade_results(center) if reason in r["msg"]]
    assert failed
    assert failed[-1]["status"] == "failed"
    assert center.packaged()[-1][1].version == amd64_dist.version
    assert_a_runs_unchanged(container, amd64_dist, pid)


def test_build_without_a_run_path_module_is_refused_by_the_selftest_probe(
    container: Container, center: CenterThread, amd64_dist: Dist, debs: dict[str, Path]
) -> None:
    pid = container.prop("MainPID")
    offer(center, debs, NOMODULE_VERSION)
    reason = "ModuleNotFoundError: No module named 'uvloop'"
    wait_for("the refusal in a heartbeat", lambda: any(reason in e for e in errors(center)),
             STEP_TIMEOUT)
    beat = next(r for r in center.records(1000) if reason in r.fields["upgrade_error"])
    assert f"upgrade from {amd64_dist.version} to {NOMODULE_VERSION} failed: probe: selftest " \
           "failed (exit 1)" in beat.fields["upgrade_error"]
    assert_a_runs_unchanged(container, amd64_dist, pid)


def test_guard_restores_a_when_the_installed_deb_cannot_start(
    container: Container, center: CenterThread, amd64_dist: Dist, debs: dict[str, Path]
) -> None:
    a = amd64_dist.version
    # Offered from the restart on (the center sends its Configs on connect), so the
    # restarted A does not try the refused build again first.
    deb = debs[GUARDED_VERSION]
    center.set_configs([{
        "name": "elkeid-agent", "version": GUARDED_VERSION,
        "sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
        "download_urls": [center.file_url(deb.name)],
    }])
    # Test-only: no selftest, so the impostor is installed; restarts 3 s apart (not 45).
    container.sh(
        "mkdir -p /etc/systemd/system/elkeid-agent.service.d && printf '%s\\n' '[Service]' "
        "'Environment=ELKEID_TEST_SKIP_SELFTEST=1' 'RestartSec=3' "
        "> /etc/systemd/system/elkeid-agent.service.d/test.conf && systemctl daemon-reload "
        "&& systemctl restart elkeid-agent.service"
    )
    wait_for("A active again", lambda: container.prop("ActiveState") == "active", 180)
    wait_for("dpkg lists the impostor",
             lambda: dpkg_version(container) == f"3:{GUARDED_VERSION}-1", STEP_TIMEOUT)
    wait_for(
        "A back, reporting the rollback",
        lambda: any(r.fields.get("upgrade_state") == "quarantined"
                    and GUARDED_VERSION in r.fields.get("upgrade_error", "")
                    for r in center.records(1000)),
        STEP_TIMEOUT,
    )
    beat = [r for r in center.records(1000) if r.fields.get("upgrade_state") == "quarantined"][-1]
    error = beat.fields["upgrade_error"]
    assert f"upgrade from {a} to {GUARDED_VERSION} rolled back" in error
    assert f"{GUARDED_VERSION} started 3 times without reaching the server (counted by the " \
           "upgrade guard)" in error
    assert f"the dpkg database still lists {GUARDED_VERSION}" in error
    assert center.packaged()[-1][1].version == a
    assert any("rolled back" in r["msg"] for r in upgrade_results(center))
    assert container.prop("ActiveState") == "active"
    assert container.sh(f"{ENV} /etc/elkeid/elkeid-agent --version").stdout.strip() == a
    journal = container.sh("journalctl -u elkeid-agent.service --no-pager", check=False).stdout
    for n in (1, 2, 3):
        assert f"start {n} of 3 without confirmation" in journal
    status = container.sh(f"{ENV} /etc/elkeid/elkeid-agent ctl status", check=False).stdout
    assert f"version: {a}" in status
    assert f"last upgrade: {GUARDED_VERSION} rolled back to {a}" in status
    assert f"quarantined: {GUARDED_VERSION} until" in status
    # The impostor never ran any agent code: only the guard counted.
    assert "elkeid-agent: configuration error" not in journal
