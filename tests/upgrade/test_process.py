"""The agent process upgrading itself against the local center, with stand-ins for the two
versions (the source tree run as "A" or "B"; see upgradetools.RUNNER). The test plays the
service manager: it restarts `<work_dir>/elkeid-agent` whenever it exits."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentConfig
from test_probe import aarch64_elf
from upgradetools import Service, http_files, impostor, sha, standin

from elkeid_center.testing import CenterThread, DecodedRecord

FAST = {"heartbeat_interval": 0.5, "dial_timeout": 1.0, "backoff_initial": 0.2,
        "backoff_max": 1.0}


def upgrade_config(version: str, body: bytes, url: str, digest: str | None = None
                   ) -> dict[str, Any]:
    return {"name": "elkeid-agent", "version": version, "sha256": digest or sha(body),
            "download_urls": [url]}


def install_a(tmp_path: Path, agent_config: AgentConfig) -> tuple[Path, Path, bytes]:
    config = agent_config(transport=FAST)
    work = tmp_path / "agent-work"
    work.mkdir(parents=True, exist_ok=True)
    a = standin(tmp_path / "runner", "A")
    (work / "elkeid-agent").write_bytes(a)
    (work / "elkeid-agent").chmod(0o700)
    return config, work, a


def serve(tmp_path: Path, name: str, body: bytes) -> None:
    files = tmp_path / "files"
    files.mkdir(exist_ok=True)
    (files / name).write_bytes(body)


def beats(center: CenterThread) -> list[DecodedRecord]:
    return center.records(1000)


def wait_beat(center: CenterThread, pred: Any, timeout: float = 30) -> DecodedRecord:
    return center.wait_for(lambda: next((b for b in reversed(beats(center)) if pred(b)), None),
                           timeout)


def results(center: CenterThread) -> list[dict[str, str]]:
    return [r.fields for r in center.records(5100) if r.fields["token"] == "upgrade"]


def test_success_probe_swap_restart_confirm(
    center: CenterThread, agent_config: AgentConfig, tmp_path: Path
) -> None:
    config, work, a = install_a(tmp_path, agent_config)
    b = standin(tmp_path / "runner", "B")
    serve(tmp_path, "b", b)
    center.set_configs([upgrade_config("B", b, center.file_url("b"))])
    service = Service(work, config, {})
    try:
        service.start()
        assert service.wait(60) == 0  # A exits on its own after the swap
        assert (work / "elkeid-agent").read_bytes() == b
        assert (work / "elkeid-agent.prev").read_bytes() == a
        record = json.loads((work / "upgrade.json").read_text())
        assert (record["from_version"], record["to_version"], record["method"]) == (
            "A", "B", "file")
        center.clear()
        service.start()  # the service manager's restart
        beat = wait_beat(center, lambda b: b.fields["upgrade_state"] == "confirmed")
        assert beat.fields["state"] == "running"
        assert center.packaged()[-1][1].version == "B"
        assert not (work / "upgrade.json").exists()
        assert results(center)[-1]["status"] == "succeed"
        assert "upgraded from A to B" in results(center)[-1]["msg"]
        assert service.alive()
    finally:
        service.stop()
    assert "probing" in service.log()


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong-arch", "built for aarch64, this agent runs on x86-64"),
        ("truncated", "download:"),
        ("wrong-sha256", "sha256"),
        ("other-version", "printed 'C', expected 'B'"),
        ("hang", "--version did not finish within 2 s"),
    ],
)
def test_failed_probe_keeps_a_running_with_the_reason(
    center: CenterThread, agent_config: AgentConfig, tmp_path: Path, case: str, reason: str
) -> None:
    config, work, a = install_a(tmp_path, agent_config)
    b = standin(tmp_path / "runner", "B")
    digest = None
    url = center.file_url("b")
    if case == "wrong-arch":
        b = aarch64_elf()
    elif case == "wrong-sha256":
        digest = sha(b"something else")
    elif case == "other-version":
        b = standin(tmp_path / "runner", "C")
    elif case == "hang":
        b = standin(tmp_path / "runner", "B", mode="hang")
    serve(tmp_path, "b", b)
    service = Service(work, config, {"TEST_PROBE_TIMEOUT": "2"})
    with http_files({"/b": b}, truncate=True) as truncating:
        if case == "truncated":
            url = truncating + "/b"
        center.set_configs([upgrade_config("B", b, url, digest)])
        try:
            service.start()
            beat = wait_beat(center, lambda b: reason in b.fields["upgrade_error"])
            assert beat.fields["state"] == "abnormal"
            assert reason in " ".join(json.loads(beat.fields["state_detail"]))
            assert beat.fields["upgrade_state"] == "idle"
            failed = results(center)[-1]
            assert failed["status"] == "failed"
            assert reason in failed["msg"]
            # A keeps streaming, unchanged.
            count = len(beats(center))
            center.wait_records(1000, count=count + 2, timeout=10)
            assert service.alive()
            assert (work / "elkeid-agent").read_bytes() == a
            assert not (work / "upgrade.json").exists()
            assert not (work / "elkeid-agent.prev").exists()
            assert list((work / "tmp").iterdir()) == []
        finally:
            service.stop()


def _quarantined_a_ignores_b(
    center: CenterThread, service: Service, work: Path, a: bytes, reason: str,
    pushed: dict[str, Any],
) -> None:
    assert (work / "elkeid-agent").read_bytes() == a
    quarantine = json.loads((work / "upgrade-quarantine.json").read_text())["versions"]
    assert quarantine["B"] > time.time() + 23 * 3600
    center.clear()
    downloads = len(center.file_requests())
    service.start()
    beat = wait_beat(center, lambda b: b.fields["upgrade_state"] == "quarantined")
    assert reason in beat.fields["upgrade_error"]
    assert "quarantined until" in beat.fields["upgrade_error"]
    assert beat.fields["state"] == "abnormal"
    assert center.packaged()[-1][1].version == "A"
    assert any("rolled back" in r["msg"] for r in results(center))
    # The server keeps sending B: not downloaded, not tried, said once in the log.
    center.disconnect()
    center.wait_for(lambda: len([c for c in center.connections() if c.packages]) >= 2, 20)
    for _ in range(3):
        center.send_configs([pushed])
    time.sleep(2)
    assert len(center.file_requests()) == downloads
    assert service.alive()
    assert service.log().count("upgrade to B ignored: quarantined") == 1


def test_crash_loop_restores_a_and_quarantines_b(
    center: CenterThread, agent_config: AgentConfig, tmp_path: Path
) -> None:
    config, work, a = install_a(tmp_path, agent_config)
    b = standin(tmp_path / "runner", "B", mode="crash")
    serve(tmp_path, "b", b)
    pushed = upgrade_config("B", b, center.file_url("b"))
    center.set_configs([pushed])
    service = Service(work, config, {})
    try:
        service.start()
        assert service.wait(60) == 0
        assert (work / "elkeid-agent").read_bytes() == b
        # B dies at every start; the fourth unconfirmed start restores A and exits 75.
        codes = []
        for _ in range(4):
            service.start()
            codes.append(service.wait(60))
        assert codes == [1, 1, 1, 75]
        _quarantined_a_ignores_b(center, service, work, a, "started 3 times", pushed)
    finally:
        service.stop()


def test_b_that_cannot_reach_the_server_is_rolled_back_within_the_bound(
    center: CenterThread, agent_config: AgentConfig, tmp_path: Path
) -> None:
    config, work, a = install_a(tmp_path, agent_config)
    b = standin(tmp_path / "runner", "B", mode="offline")
    serve(tmp_path, "b", b)
    pushed = upgrade_config("B", b, center.file_url("b"))
    center.set_configs([pushed])
    bound = 4.0
    service = Service(work, config, {"TEST_UPGRADE_BOUND": str(bound)})
    try:
        service.start()
        assert service.wait(60) == 0
        swapped_at = json.loads((work / "upgrade.json").read_text())["started_at"]
        service.start()
        # B runs, never connects, and gives up on its own once the bound has passed.
        assert service.wait(bound + 20) == 0
        assert time.time() - swapped_at >= bound
        assert "did not reach the server within 4 s" in service.log()
        _quarantined_a_ignores_b(center, service, work, a, "did not reach the server", pushed)
    finally:
        service.stop()


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        # Not our program: answers --version as B, exits 1 for anything else.
        ("impostor", "selftest exited with 1 without an answer: impostor: not an agent"),
        # Our program without a module only the run path imports.
        ("nomodule", "selftest failed (exit 1): ModuleNotFoundError: import of uvloop halted"),
    ],
)
def test_selftest_probe_refuses_a_candidate_that_passes_version_but_cannot_run(
    center: CenterThread, agent_config: AgentConfig, tmp_path: Path, case: str, reason: str
) -> None:
    config, work, a = install_a(tmp_path, agent_config)
    b = impostor("B") if case == "impostor" else standin(tmp_path / "runner", "B", "nomodule")
    serve(tmp_path, "b", b)
    center.set_configs([upgrade_config("B", b, center.file_url("b"))])
    service = Service(work, config, {}, guard=True)
    try:
        service.start()
        beat = wait_beat(center, lambda b: reason in b.fields["upgrade_error"], 60)
        assert beat.fields["state"] == "abnormal"
        assert beat.fields["upgrade_state"] == "idle"
        failed = results(center)[-1]
        assert failed["status"] == "failed"
        assert reason in failed["msg"]
        assert service.alive()
        assert (work / "elkeid-agent").read_bytes() == a
        assert not (work / "upgrade.json").exists()
        assert not (work / "elkeid-agent.prev").exists()
        assert center.packaged()[-1][1].version == "A"
    finally:
        service.stop()
    assert "--version" in service.log()
    assert "selftest --config" in service.log()


def test_guard_restores_a_when_b_dies_before_its_own_code_runs(
    center: CenterThread, agent_config: AgentConfig, tmp_path: Path
) -> None:
    """The selftest probe is skipped (test-only switch), so the impostor is swapped in. It
    never reaches the agent's start-up check; the guard, run from A's saved executable
    before every start, counts its starts and puts A back before the fourth."""
    config, work, a = install_a(tmp_path, agent_config)
    b = impostor("B")
    serve(tmp_path, "b", b)
    pushed = upgrade_config("B", b, center.file_url("b"))
    center.set_configs([pushed])
    service = Service(work, config, {"ELKEID_TEST_SKIP_SELFTEST": "1"}, guard=True)
    try:
        service.start()
        assert service.wait(60) == 0
        assert (work / "elkeid-agent").read_bytes() == b
        assert "selftest probe skipped" in service.log()
        codes = []
        for _ in range(3):
            service.start()
            codes.append(service.wait(60))
        assert codes == [1, 1, 1]  # B never counted anything itself
        record = json.loads((work / "upgrade.json").read_text())
        assert (record["guard_starts"], record["starts_without_confirm"]) == (3, 0)
        center.clear()
        service.start()  # the guard restores A first; A starts
        assert (work / "elkeid-agent").read_bytes() == a
        assert "rolled back" in service.guard_output[-1]
        beat = wait_beat(center, lambda b: b.fields["upgrade_state"] == "quarantined")
        assert "started 3 times without reaching the server (counted by the upgrade guard)" in (
            beat.fields["upgrade_error"])
        assert center.packaged()[-1][1].version == "A"
        assert any("upgrade from A to B rolled back" in r["msg"] for r in results(center))
        assert service.alive()
        assert json.loads((work / "upgrade-quarantine.json").read_text())["versions"]["B"] > (
            time.time() + 23 * 3600)
        outcome = json.loads((work / "upgrade-last.json").read_text())
        assert (outcome["from_version"], outcome["to_version"], outcome["result"]) == (
            "A", "B", "rolled_back")
    finally:
        service.stop()
