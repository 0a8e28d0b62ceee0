"""Unit tests of the pieces the frozen executable's service side uses: the status file,
`ctl` (set, status, cleanup) and the stale unpack dir cleaner. Fast: not marked."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pytest

from elkeid_agent import ctl
from elkeid_agent.runtime_dir import MIN_AGE_S, clean_stale_unpack_dirs
from elkeid_agent.status import STATUS_FILE, AgentStatus, read_status, write_status


def _status(**kw: object) -> AgentStatus:
    base: dict[str, object] = {
        "pid": 42,
        "version": "1.9.0.9",
        "state": "running",
        "net_mode": "private",
        "connected": True,
        "server": "127.0.0.1:6751",
        "last_heartbeat": time.time() - 5,
        "updated": time.time(),
    }
    base.update(kw)
    return AgentStatus(**base)  # type: ignore[arg-type]


def test_status_round_trips_and_replaces_atomically(tmp_path: Path) -> None:
    write_status(tmp_path, _status())
    write_status(tmp_path, _status(state="abnormal", upgrade_state="probing"))
    st = read_status(tmp_path)
    assert st is not None
    assert (st.state, st.upgrade_state, st.pid) == ("abnormal", "probing", 42)
    assert [p.name for p in tmp_path.iterdir()] == [STATUS_FILE]
    # Not readable by other users: its detail may name hosts and reasons (issue 22).
    assert (tmp_path / STATUS_FILE).stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("content", [None, b"", b"{not json", b'{"pid": "x"}'])
def test_missing_or_bad_status_reads_as_none(tmp_path: Path, content: bytes | None) -> None:
    if content is not None:
        (tmp_path / STATUS_FILE).write_bytes(content)
    assert read_status(tmp_path) is None


def _ctl(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="elkeid-agent")
    ctl.add_ctl_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["ctl", *argv])


def test_set_writes_specified_env_and_keeps_other_lines(tmp_path: Path) -> None:
    (tmp_path / "specified_env").write_text(
        "service_type=systemd\nspecified_idc=old\n# comment\nspecified_id=gone\n"
    )
    args = _ctl(["--work-dir", str(tmp_path), "set", "--idc", "idc-a", "--id", "agent-1"])
    assert ctl.run_ctl(args) == 0
    lines = (tmp_path / "specified_env").read_text().splitlines()
    assert lines == [
        "service_type=systemd",
        "specified_idc=idc-a",
        "# comment",
        "specified_id=agent-1",
        "SPECIFIED_AGENT_ID=agent-1",
    ]
    args = _ctl(["--work-dir", str(tmp_path), "set", "--region", "r1", "--idc", ""])
    assert ctl.run_ctl(args) == 0
    lines = (tmp_path / "specified_env").read_text().splitlines()
    assert "specified_region=r1" in lines
    assert not [line for line in lines if line.startswith("specified_idc")]


def test_set_needs_an_option_and_refuses_newlines(tmp_path: Path) -> None:
    assert ctl.run_ctl(_ctl(["--work-dir", str(tmp_path), "set"])) == 2
    assert ctl.run_ctl(_ctl(["--work-dir", str(tmp_path), "set", "--idc", "a\nb=c"])) == 2
    assert not (tmp_path / "specified_env").exists()


def test_status_without_systemd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(ctl, "_systemd_running", lambda: False)
    assert ctl.run_ctl(_ctl(["--work-dir", str(tmp_path), "status"])) == 3
    assert "agent: no status yet" in capsys.readouterr().out
    write_status(tmp_path, _status())
    # pid 42 is not an agent: the record is not believed.
    assert ctl.run_ctl(_ctl(["--work-dir", str(tmp_path), "status"])) == 3
    out = capsys.readouterr().out
    assert "state: dead" in out
    assert "connection: disconnected" in out
    # As if pid 42 were the live agent (tests/test_ctl.py runs a real one).
    monkeypatch.setattr(ctl, "is_agent_process", lambda pid, started: True)
    assert ctl.run_ctl(_ctl(["--work-dir", str(tmp_path), "status"])) == 0
    out = capsys.readouterr().out
    assert "service: unknown (systemd is not running)" in out
    assert "version: 1.9.0.9" in out
    assert "connection: connected 127.0.0.1:6751 (private)" in out
    assert "s ago)" in out
    write_status(tmp_path, _status(updated=time.time() - 3600, connected=False))
    ctl.run_ctl(_ctl(["--work-dir", str(tmp_path), "status"]))
    out = capsys.readouterr().out
    assert "(stale record)" in out
    assert "connection: disconnected" in out


def test_service_verbs_need_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctl, "_systemd_running", lambda: False)
    for verb in ("start", "stop", "restart", "enable", "disable"):
        assert ctl.run_ctl(_ctl([verb])) == 1


def test_cleanup_empties_plugin_log_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctl, "_systemd_running", lambda: False)
    # Any other agent on the machine whose work dir is unknown (a bench's, with its config
    # deleted) makes cleanup refuse, rightly; that refusal has its own test (test_ops_truth).
    monkeypatch.setattr(ctl, "running_agents", list)
    for rel in ("plugin/p/p.bin", "log/a.log", "tmp/download.part", "machine-id"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    young = tmp_path / "tmp" / "_MEIyoung"
    young.mkdir()
    assert ctl.run_ctl(_ctl(["--work-dir", str(tmp_path), "cleanup"])) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log", "machine-id", "plugin", "tmp"]
    assert not list((tmp_path / "plugin").iterdir())
    assert not list((tmp_path / "log").iterdir())
    # A fresh unpack dir may belong to a process still starting: it stays.
    assert [p.name for p in (tmp_path / "tmp").iterdir()] == ["_MEIyoung"]


def _age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_clean_stale_unpack_dirs(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    stale, used, young, other = (tmp / n for n in ("_MEIstale", "staticx-used", "_MEIyoung", "x"))
    for d in (stale, used, young, other):
        (d / "lib").mkdir(parents=True)
    for d in (stale, used, other):
        _age(d, MIN_AGE_S + 60)
    proc = tmp_path / "proc"
    (proc / "1").mkdir(parents=True)
    (proc / "self").mkdir()
    (proc / "1" / "maps").write_text(
        f"7f00-7f01 r-xp 00000000 08:01 1234  {used.resolve()}/libc.so.6\n"
        "7f02-7f03 r--p 00000000 00:00 0 [heap]\n"
    )
    assert clean_stale_unpack_dirs(tmp, proc=proc) == 1
    assert sorted(p.name for p in tmp.iterdir()) == ["_MEIyoung", "staticx-used", "x"]
    assert clean_stale_unpack_dirs(tmp_path / "missing", proc=proc) == 0
