"""`ctl status`, `ctl cleanup` and `doctor` tell the truth in the faults an operator meets
(issue 22): a read-only work dir, a mistyped --config, a reused pid, a crash-looping plugin,
an agent run by hand, service discovery down while the private address answers, a bad CA, a
reader that leaves early; and builds that cannot be mistaken for releases."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from agentproc import REPO, AgentProcess, patch_config, wait_until
from conftest import AgentConfig
from diskfaults import read_only, require_root

from elkeid_agent.doctor import (
    EXIT_DEGRADED,
    EXIT_DOWN,
    PACKAGED_EXECUTABLE,
    TEST_PKI_MARK,
    Verdict,
    checks,
)
from elkeid_agent.procscan import _work_dir_of, agent_run_args, config_arg
from elkeid_agent.status import AgentStatus, write_status
from elkeid_center.testing import CenterThread

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def agent_cmd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "elkeid_agent", *args],
        env=ENV, capture_output=True, text=True, timeout=timeout, check=False,
    )


def status_json(config: Path) -> tuple[int, dict[str, Any]]:
    done = agent_cmd("ctl", "status", "--config", str(config), "--json")
    assert not done.stderr, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return done.returncode, report


def work_dir_of(config: Path) -> Path:
    import tomllib

    return Path(tomllib.loads(config.read_text())["work_dir"])


# --- ctl status -------------------------------------------------------------------------------


def test_status_of_a_connected_agent_on_a_read_only_work_dir(
    center: CenterThread, agent_config: AgentConfig
) -> None:
    require_root()
    config = agent_config()
    work = work_dir_of(config)
    work.mkdir()
    with contextlib.ExitStack() as stack:
        with read_only(work):
            agent = stack.enter_context(AgentProcess(config))
            center.wait_connected(timeout=20)
            code, report = wait_until(lambda: (r := status_json(config))[1]["connected"] and r, 20)
            assert report["pid"] == agent.pid
            assert report["running"] is True
            assert report["server"] == center.address
            # Truthful: it runs and is connected, and cannot write its status (abnormal).
            assert report["state"] == "abnormal"
            assert code == 1
            assert any("read-only filesystem" in d for d in report["detail"]), report["detail"]
            text = agent_cmd("ctl", "status", "--config", str(config)).stdout
            assert f"agent pid: {agent.pid}\n" in text
            assert f"connection: connected {center.address}" in text
        agent.stop()


def test_a_mistyped_config_is_an_error_not_a_report_on_etc_elkeid(tmp_path: Path) -> None:
    missing = tmp_path / "agnet.toml"
    for args in (
        ("ctl", "status", "--config", str(missing)),
        ("ctl", "--config", str(missing), "status"),
        ("ctl", "cleanup", "--config", str(missing)),
    ):
        done = agent_cmd(*args)
        assert done.returncode == 2, done
        assert done.stdout == ""
        assert done.stderr == f"ctl: --config {missing}: no such file\n"
    done = agent_cmd("doctor", "--config", str(missing))
    assert done.returncode == EXIT_DOWN
    assert "/etc/elkeid" not in done.stdout
    assert f"FAIL  config: --config {missing}: no such file" in done.stdout


def test_a_reused_pid_is_named_for_what_it_is(tmp_path: Path) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_status(tmp_path, AgentStatus(
            pid=other.pid, version="1.9", state="running", net_mode="private", connected=True,
            server="10.0.0.1:6751", last_heartbeat=1.0, updated=time.time(),
            started=psutil.Process(other.pid).create_time() - 100,
        ))
        done = agent_cmd("ctl", "--work-dir", str(tmp_path), "status", "--json")
        report = json.loads(done.stdout)
        assert done.returncode == 3
        assert report["state"] == "dead"
        reason = report["exit_reason"]
        assert f"pid {other.pid} is now another program: python" in reason, reason
        assert "time.sleep(60)" in reason
    finally:
        other.kill()
        other.wait()


def test_a_crash_looping_plugin_is_never_shown_running(
    center: CenterThread, agent_config: AgentConfig, tmp_path: Path
) -> None:
    exe = b'#!/bin/sh\necho starting >&2\nsleep 1.5\necho "panic: boom" >&2\nexit 1\n'
    files = tmp_path / "files"
    files.mkdir()
    (files / "crasher").write_bytes(exe)
    center.set_configs([{
        "name": "crasher", "version": "1.0.0", "sha256": hashlib.sha256(exe).hexdigest(),
        "download_urls": [center.file_url("crasher")],
    }])
    # Heartbeats a minute apart: the status file must follow the plugin, not the heartbeat.
    config = agent_config(transport={"heartbeat_interval": 60.0})
    stderr = work_dir_of(config) / "plugin" / "crasher" / "crasher.stderr"
    with AgentProcess(config) as agent:
        code, report = wait_until(
            lambda: (r := status_json(config))[1].get("state") == "abnormal"
            and any("panic: boom" in d for d in r[1]["detail"]) and r, 30,
        )
        assert code == 1
        [line] = [d for d in report["detail"] if "crasher" in d]
        assert "exited with code 1" in line
        assert f"stderr {stderr} ends 'panic: boom'" in line
        assert "plugin/crasher/crasher.stderr" in line
        seen = set()
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            _, report = status_json(config)
            seen.add(report["state"])
        assert seen == {"abnormal"}, seen
        assert "plugin crasher" in agent.log()
        agent.stop()


# --- ctl cleanup ------------------------------------------------------------------------------


def test_cleanup_refuses_while_an_agent_runs_by_hand(
    center: CenterThread, agent_config: AgentConfig
) -> None:
    config = agent_config()
    work = work_dir_of(config)
    with AgentProcess(config) as agent:
        center.wait_connected(timeout=20)
        wait_until((work / "log").is_dir, 10)
        done = agent_cmd("ctl", "--work-dir", str(work), "cleanup")
        assert done.returncode == 1
        assert f"(pid {agent.pid})" in done.stderr
        assert (work / "log" / "elkeid-agent.log").is_file()
        agent.stop()
    done = agent_cmd("ctl", "cleanup", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert not list((work / "log").iterdir())


def test_agent_command_lines_are_recognised() -> None:
    py = sys.executable
    for cmdline, args in (
        (["/etc/elkeid/elkeid-agent"], []),
        (["/etc/elkeid/elkeid-agent", "run", "--config", "a.toml"], ["run", "--config", "a.toml"]),
        ([py, "-m", "elkeid_agent", "run", "--config", "x"], ["run", "--config", "x"]),
        ([py, "-X", "dev", "-m", "elkeid_agent"], []),
        ([py, ".venv/bin/elkeid-agent", "run"], ["run"]),
    ):
        assert agent_run_args(cmdline) == args, cmdline
    for cmdline in (
        ["/etc/elkeid/elkeid-agent", "ctl", "cleanup"],
        ["/etc/elkeid/elkeid-agent", "--version"],
        ["/etc/elkeid/elkeid-agent", "doctor", "--config", "run"],
        [py, "-m", "pytest", "elkeid_agent"],
        [py, "-c", "elkeid-agent"],
        ["/usr/bin/vim", "elkeid-agent"],
        [],
    ):
        assert agent_run_args(cmdline) is None, cmdline
    assert config_arg(["run", "--config=/x.toml"]) == "/x.toml"
    assert config_arg(["run"]) is None


def test_a_config_named_by_any_process_is_read_safely(tmp_path: Path) -> None:
    good = tmp_path / "a.toml"
    good.write_text(f'work_dir = "{tmp_path / "w"}"\n')
    assert _work_dir_of(str(good)) == tmp_path / "w"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert _work_dir_of(str(fifo)) is None  # at once: no writer is waited for
    assert _work_dir_of("/dev/zero") is None
    assert _work_dir_of(str(tmp_path / "missing.toml")) is None


def test_a_config_nested_too_deeply_for_tomllib_does_not_end_ctl(tmp_path: Path) -> None:
    """Any user may start `elkeid-agent --config F` with F nesting arrays a million deep:
    tomllib recurses, and root's `ctl status` / `ctl cleanup` must still answer."""
    deep = tmp_path / "deep.toml"
    deep.write_text("work_dir = " + "[" * 200_000)
    broken = tmp_path / "broken.toml"
    broken.write_text("work_dir = [")
    # Read as leniently as any config that does not parse.
    assert _work_dir_of(str(deep)) == _work_dir_of(str(broken))


def test_a_work_dir_holding_a_nul_does_not_end_ctl(tmp_path: Path) -> None:
    config = tmp_path / "nul.toml"
    config.write_text('work_dir = "/tmp/a\\u0000b"\n')
    assert _work_dir_of(str(config)) is None


def test_a_config_named_by_any_process_is_never_opened_unless_regular(tmp_path: Path) -> None:
    """Opening a device has effects of its own (/dev/watchdog arms the host's reboot timer, a
    tape rewinds): a local user's `elkeid-agent --config /dev/watchdog` must not make root's
    `ctl status` or `ctl cleanup` open it. Seen through a FIFO: a writer blocked in open()
    returns once a reader opens it."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "c.toml"
    link.symlink_to(fifo)
    opened = threading.Event()

    def writer() -> None:
        fd = os.open(fifo, os.O_WRONLY)
        opened.set()
        os.close(fd)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        assert _work_dir_of(str(link)) is None
        assert not opened.wait(1.0), "the FIFO was opened for reading"
    finally:
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # let the writer go
        thread.join(5)


# --- doctor -----------------------------------------------------------------------------------


def test_doctor_sd_down_private_fine_is_a_warning(
    center: CenterThread, agent_config: AgentConfig
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    config = agent_config(
        regions={"default": {"service_discovery": dead, "private": center.address}}
    )
    work_dir_of(config).mkdir()
    found = {c.name: c for c in checks(str(config), dict(os.environ))}
    sd = found[f"service discovery {dead}"]
    assert sd.verdict is Verdict.WARN
    assert sd.detail.startswith(f"connection refused by {dead}"), sd.detail
    assert "service discovery" not in sd.detail
    assert "Errno" not in sd.detail
    assert "[" not in sd.detail
    assert found[f"connect private {center.address}"].verdict is Verdict.OK
    done = agent_cmd("doctor", "--config", str(config))
    assert done.returncode == EXIT_DEGRADED, done.stdout
    # Without a private or public address to fall back on, it is a failure.
    alone = patch_config(agent_config("alone"), regions={"default": {"service_discovery": dead}})
    found = {c.name: c for c in checks(str(alone), dict(os.environ))}
    assert found[f"service discovery {dead}"].verdict is Verdict.FAIL


def test_doctor_blames_a_bad_ca_on_the_ca_alone(
    center: CenterThread, agent_config: AgentConfig, tmp_path: Path
) -> None:
    bad = tmp_path / "bad-ca.crt"
    bad.write_text("not a certificate\n")
    config = agent_config(tls={"ca": str(bad)})
    found = {c.name: c for c in checks(str(config), dict(os.environ))}
    assert found["tls.ca"].verdict is Verdict.FAIL
    assert found["tls.key"].verdict is Verdict.OK, found["tls.key"]
    assert "tls.ca" not in found["tls.key"].detail
    # A key that is not the certificate's is still found with the CA broken.
    other = agent_config("other", tls={"ca": str(bad), "key": str(center.certs.server_key)})
    found = {c.name: c for c in checks(str(other), dict(os.environ))}
    assert found["tls.key"].verdict is Verdict.FAIL
    assert "is not the unencrypted private key" in found["tls.key"].detail


def test_doctor_into_a_closed_pipe_ends_quietly(agent_config: AgentConfig) -> None:
    config = agent_config()
    done = subprocess.run(
        f"'{sys.executable}' -m elkeid_agent doctor --config '{config}' | head -1",
        shell=True, env=ENV, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.stdout.startswith("ok    version: ")
    assert done.stderr == "", done.stderr


def test_doctor_warns_of_a_test_build_on_a_packaged_install(
    center: CenterThread, agent_config: AgentConfig
) -> None:
    # The local center's certificates are the test PKI `make dist` ships without CERTS_DIR.
    assert TEST_PKI_MARK in ssl.PEM_cert_to_DER_cert(center.certs.ca.read_text())
    config = agent_config()
    work_dir_of(config).mkdir()
    here = [c for c in checks(str(config), dict(os.environ), program=sys.executable)
            if c.name == "test build"]
    assert here == []  # a checkout against the local center is what tests do
    packaged = [c for c in checks(str(config), dict(os.environ), program=PACKAGED_EXECUTABLE)
                if c.name == "test build"]
    assert [c.verdict for c in packaged] == [Verdict.WARN, Verdict.WARN]
    assert "test CA" in packaged[0].detail
    assert f"server {center.address} is this host (loopback)" in packaged[1].detail


# --- builds -----------------------------------------------------------------------------------


def inputs(**env: str) -> list[str]:
    script = f'project={REPO}; . {REPO}/build/inputs.sh; echo "$version"; not_a_release'
    clean = {k: v for k, v in os.environ.items()
             if k not in ("BUILD_VERSION", "CERTS_DIR", "PRODUCT_CONFIG")}
    done = subprocess.run(["bash", "-c", script], env={**clean, **env}, capture_output=True,
                          text=True, check=True)
    return done.stdout.splitlines()


def test_a_default_build_is_marked_and_says_so() -> None:
    from elkeid_agent.version import VERSION

    version, note = inputs()
    assert version == f"{VERSION}~test"
    assert note.startswith("dist: NOT A RELEASE: BUILD_VERSION CERTS_DIR PRODUCT_CONFIG not set")
    assert "test CA" in note
    assert "loopback server" in note
    # dpkg sorts the test build below the release of the same number.
    if shutil.which("dpkg"):
        older = subprocess.run(["dpkg", "--compare-versions", f"3:{version}-1", "lt",
                                f"3:{VERSION}-1"], check=False)
        assert older.returncode == 0
    # The package tests set BUILD_VERSION only: their version is theirs, the note still comes.
    version, note = inputs(BUILD_VERSION="1.9.0.86")
    assert version == "1.9.0.86"
    assert note.startswith("dist: NOT A RELEASE: CERTS_DIR PRODUCT_CONFIG not set")
    assert inputs(BUILD_VERSION="2.0", CERTS_DIR="/c", PRODUCT_CONFIG="/p") == ["2.0"]
