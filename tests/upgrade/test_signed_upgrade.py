"""The agent's own upgrade under the signing policy (issue 21), in-process with real HTTP,
real files and real probes: in enforce, an unsigned, tampered, foreign or downgrading
artifact is refused before any probe runs it; a signed one is swapped in with its block cut
off (a package's too, so dpkg gets the package it expects)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest
from signtools import TestKey, tamper
from test_manager import FAKE_DPKG, drive, setup_work, spec
from upgradetools import http_files, make_deb, need_dpkg_deb, sha

from elkeid_agent.commands import ConfigSpec
from elkeid_agent.signing.check import Verifier
from elkeid_agent.signing.keys import Policy
from elkeid_agent.upgrade import swap
from elkeid_agent.upgrade.manager import StartupResult, UpgradeManager, UpgradeSettings
from elkeid_agent.upgrade.state import UpgradeState

RUNNING = "1.9.0.10"


@pytest.fixture(autouse=True)
def no_systemd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Whatever the test host runs, the package manager runs directly here.
    monkeypatch.setattr(swap, "SYSTEMD_RUNNING", tmp_path / "no-systemd")


def candidate(version: str, marker: Path) -> bytes:
    """Passes both probes as `version`; every run of it leaves `marker`."""
    return (f"#!/bin/sh\n# padding to change\necho run >> {marker}\n"
            f'case "$1" in\n--version) echo {version} ;;\n'
            f"selftest) echo '{{\"selftest\":\"ok\",\"version\":\"{version}\"}}' ;;\n"
            "esac\n").encode()


class Harness:
    def __init__(self, work: Path, verifier: Verifier, env: dict[str, str] | None = None):
        self.records: list[bytes] = []
        self.errors: dict[str, str] = {}
        self.counters: Counter[str] = Counter()
        self.exit_requested = asyncio.Event()
        self.manager = UpgradeManager(
            work, emit=self.records.append, errors=self.errors,
            request_exit=self.exit_requested.set,
            startup=StartupResult(False, UpgradeState.IDLE),
            env=env or {"PATH": "/usr/bin:/bin"}, settings=UpgradeSettings(),
            version=RUNNING, verifier=verifier, count=lambda c: self.counters.update([c]),
        )


def attempt(work: Path, verifier: Verifier, body: bytes, version: str,
            env: dict[str, str] | None = None) -> Harness:
    h = Harness(work, verifier, env)
    with http_files({"/b": body}) as base:
        config: ConfigSpec = spec(version, body, base + "/b")
        asyncio.run(drive(h, config, done=lambda: h.errors or h.exit_requested.is_set()))
    return h


@pytest.mark.parametrize(("case", "problem"), [
    ("unsigned", "signature: unsigned; refused"),
    ("tampered", "(changed after signing); refused"),
    ("other version", "signed for 'elkeid-agent' '1.9.0.12', not 'elkeid-agent' '1.9.0.11'"),
    ("other name", "signed for 'demo' '1.9.0.11'"),
    ("downgrade", "downgrade from 1.9.0.10 to 1.9.0.9 not allowed by the signed metadata"),
    ("unknown key", "signed with unknown key"),
])
def test_enforce_refuses_before_the_probe(tmp_path: Path, case: str, problem: str) -> None:
    key = TestKey()
    marker = tmp_path / "ran"
    version = "1.9.0.9" if case == "downgrade" else "1.9.0.11"
    plain = candidate(version, marker)
    body = {
        "unsigned": plain,
        "tampered": tamper(key.sign(plain, "elkeid-agent", version)),
        "other version": key.sign(plain, "elkeid-agent", "1.9.0.12"),
        "other name": key.sign(plain, "demo", version),
        "downgrade": key.sign(plain, "elkeid-agent", version),
        "unknown key": TestKey().sign(plain, "elkeid-agent", version),
    }[case]
    work = setup_work(tmp_path)
    before = (work / "elkeid-agent").read_bytes()
    h = attempt(work, Verifier(Policy.ENFORCE, [key.pinned]), body, version)
    assert problem in h.errors["upgrade"]
    assert b"failed" in h.records[-1]
    assert problem.encode() in h.records[-1]
    assert h.counters["signature_refused"] == 1
    assert h.manager.state == "idle"
    assert not marker.exists()  # never run, not even by the --version probe
    assert (work / "elkeid-agent").read_bytes() == before
    assert swap.read_record(work) is None
    assert not h.exit_requested.is_set()


def test_a_signed_downgrade_the_metadata_allows_and_warn_mode(tmp_path: Path) -> None:
    key = TestKey()
    marker = tmp_path / "ran"
    plain = candidate("1.9.0.9", marker)
    work = setup_work(tmp_path)
    signed = key.sign(plain, "elkeid-agent", "1.9.0.9", allow_downgrade=True)
    h = attempt(work, Verifier(Policy.ENFORCE, [key.pinned]), signed, "1.9.0.9")
    assert h.exit_requested.is_set()
    assert (work / "elkeid-agent").read_bytes() == plain  # the block cut off

    work2 = setup_work(tmp_path / "warn")
    plain2 = candidate("1.9.0.11", marker)
    h = attempt(work2, Verifier(Policy.WARN, [key.pinned]), plain2, "1.9.0.11")
    assert h.exit_requested.is_set()
    assert h.counters == Counter({"signature_warnings": 1})
    assert (work2 / "elkeid-agent").read_bytes() == plain2


@need_dpkg_deb
def test_a_signed_deb_reaches_dpkg_without_its_block(tmp_path: Path) -> None:
    key = TestKey()
    work = setup_work(tmp_path)
    plain = candidate("1.9.0.11", tmp_path / "ran")
    unsigned = make_deb(tmp_path / "b.deb", plain).read_bytes()
    deb = key.sign(unsigned, "elkeid-agent", "1.9.0.11")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # The stand-in dpkg logs the sha256 of the package it is given.
    (bin_dir / "dpkg").write_text(FAKE_DPKG.replace('echo "$2" >>', 'sha256sum "$2" >>'))
    (bin_dir / "dpkg").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "OWNED": "yes", "INSTALL": "ok",
           "TARGET": str(work / "elkeid-agent"), "DPKG_LOG": str(tmp_path / "dpkg.log")}
    h = attempt(work, Verifier(Policy.ENFORCE, [key.pinned]), deb, "1.9.0.11", env)
    assert h.exit_requested.is_set(), h.errors
    assert (tmp_path / "dpkg.log").read_text().split()[0] == sha(unsigned)
    assert (work / "elkeid-agent").read_bytes() == plain
    assert (work / "elkeid-agent.prev").exists()
