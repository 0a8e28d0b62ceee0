"""The `--version` and `selftest` probes against real processes: wrong architecture,
hangs, floods, impostors; the selftest of this tree."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import AgentConfig

from elkeid_agent.upgrade.probe import (
    RunResult,
    architecture_verdict,
    elf_machine,
    probe_verdict,
    run_bounded,
    selftest_verdict,
)
from elkeid_agent.version import VERSION

REPO = Path(__file__).resolve().parents[2]

ENV = {"PATH": "/usr/bin:/bin"}


def aarch64_elf() -> bytes:
    """The header of an aarch64 executable: the kernel refuses it on x86-64 (ENOEXEC)."""
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    return ident + struct.pack("<HHIQQQIHHHHHH", 2, 183, 1, 0x400000, 64, 0, 0, 64, 56, 0, 64,
                               0, 0)


def script(tmp_path: Path, body: str, name: str = "candidate") -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o700)
    return path


def probe(path: Path, tmp_path: Path, timeout: float = 5.0, expected: str = "B",
          ) -> tuple[RunResult, str | None]:
    result = asyncio.run(run_bounded([str(path), "--version"], ENV, timeout=timeout,
                                     output=tmp_path / "out"))
    return result, probe_verdict(result, expected, timeout)


def test_exact_version_passes(tmp_path: Path) -> None:
    result, reason = probe(script(tmp_path, 'echo "B"'), tmp_path)
    assert reason is None
    assert result.returncode == 0


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("echo C", "printed 'C', expected 'B'"),
        ("echo B; echo extra", "printed 'B\\nextra'"),
        ("echo broken >&2; exit 3", "exited with 3: broken"),
        ("exit 126", "cannot execute (exit 126"),
        ("kill -9 $$", "exited with -9"),
    ],
)
def test_failures_say_why(tmp_path: Path, body: str, reason: str) -> None:
    _, why = probe(script(tmp_path, body), tmp_path)
    assert why is not None
    assert reason in why


def test_wrong_architecture_fails_to_run(tmp_path: Path) -> None:
    path = tmp_path / "candidate"
    path.write_bytes(aarch64_elf())
    path.chmod(0o700)
    _, why = probe(path, tmp_path)
    assert why is not None
    if Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        # qemu is registered for aarch64 here: the stub runs under emulation and fails.
        assert "exited with" in why
    else:
        assert why == "cannot execute: Exec format error (built for another architecture?)"


def test_wrong_architecture_is_caught_before_running() -> None:
    own = Path("/proc/self/exe").read_bytes()[:20]
    assert architecture_verdict(aarch64_elf(), own) == (
        "built for aarch64, this agent runs on x86-64"
    )
    assert architecture_verdict(own, own) is None
    assert architecture_verdict(b"#!/bin/sh\necho B\n....", own) is None
    assert elf_machine(aarch64_elf()) == 183
    big_endian_s390 = b"\x7fELF\x02\x02\x01" + bytes(11) + (22).to_bytes(2, "big")
    assert elf_machine(big_endian_s390) == 22


def test_not_executable(tmp_path: Path) -> None:
    path = script(tmp_path, "echo B")
    path.chmod(0o600)
    _, why = probe(path, tmp_path)
    assert why is not None
    assert "Permission denied" in why


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_hang_is_killed_with_its_whole_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild"
    path = script(tmp_path, f"sleep 300 & echo $! > {pidfile}; sleep 300")
    started = time.monotonic()
    result, why = probe(path, tmp_path, timeout=0.5)
    assert time.monotonic() - started < 3
    assert result.timed_out
    assert why == "--version did not finish within 0.5 s"
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_flood_is_cut(tmp_path: Path) -> None:
    result, why = probe(script(tmp_path, "yes B"), tmp_path, timeout=20)
    assert result.too_much_output
    assert why == "--version printed too much"


def test_leftovers_of_a_normal_exit_are_killed(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild"
    path = script(tmp_path, f"sleep 300 >/dev/null 2>&1 & echo $! > {pidfile}; echo B")
    _, why = probe(path, tmp_path)
    assert why is None
    grandchild = int(pidfile.read_text())
    time.sleep(0.2)
    assert not _alive(grandchild)


@pytest.mark.parametrize("survive", [False, True])
def test_cancellation(tmp_path: Path, survive: bool) -> None:
    pidfile = tmp_path / "pid"
    path = script(tmp_path, f"echo $$ > {pidfile}; exec sleep 300")

    async def main() -> None:
        task = asyncio.create_task(run_bounded([str(path)], ENV, timeout=60,
                                               output=tmp_path / "out", survive_cancel=survive))
        # The child writes the file; polling it is the simplest wait across processes.
        while not pidfile.exists() or not pidfile.read_text().strip():  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    pid = int(pidfile.read_text())
    time.sleep(0.2)
    try:
        assert _alive(pid) is survive
    finally:
        if survive:
            os.kill(pid, 9)
            os.waitpid(pid, 0)


def selftest(path: Path, tmp_path: Path, timeout: float = 5.0, expected: str = "B"
             ) -> str | None:
    result = asyncio.run(run_bounded([str(path), "selftest"], ENV, timeout=timeout,
                                     output=tmp_path / "selftest.out"))
    return selftest_verdict(result, expected, timeout)


OK_B = '{"selftest":"ok","version":"B"}'


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (f"echo '{OK_B}'", None),
        # Warnings before the answer are fine; the answer is the last JSON line.
        (f"echo 'warning: x' >&2; echo '{OK_B}'", None),
        ("exit 1", "selftest exited with 1 without an answer"),
        ("echo B", "selftest exited with 0 without an answer: B"),
        ("echo '{\"selftest\":\"ok\",\"version\":\"C\"}'", "answered for version 'C'"),
        ("echo '{\"selftest\":\"failed\",\"version\":\"B\",\"error\":\"ImportError: x\"}'; "
         "exit 1", "selftest failed (exit 1): ImportError: x"),
        # An ok answer with a failing exit is not ok.
        (f"echo '{OK_B}'; exit 3", "selftest failed (exit 3)"),
        ("echo '{\"selftest\": 1}'", "without an answer"),
        ("exec sleep 300", "selftest did not finish within 1 s"),
        ("yes", "selftest printed too much"),
    ],
)
def test_selftest_verdict(tmp_path: Path, body: str, reason: str | None) -> None:
    verdict = selftest(script(tmp_path, body), tmp_path, timeout=1.0)
    if reason is None:
        assert verdict is None
    else:
        assert verdict is not None
        assert reason in verdict


def test_selftest_of_this_tree_passes_and_writes_nothing(
    agent_config: AgentConfig, tmp_path: Path
) -> None:
    config = agent_config()
    work = tmp_path / "agent-work"
    before = sorted(work.rglob("*")) if work.exists() else []
    out = subprocess.run(
        [sys.executable, "-m", "elkeid_agent", "selftest", "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 0, out.stderr
    # `make setup` compiles the hot loop (tools/compile_hot.py): the answer says so.
    assert json.loads(out.stdout) == {"selftest": "ok", "version": VERSION,
                                      "framescan": "compiled"}
    assert (sorted(work.rglob("*")) if work.exists() else []) == before


def test_selftest_refuses_a_config_run_would_refuse(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("not_a_key = 1\n")
    out = subprocess.run(
        [sys.executable, "-m", "elkeid_agent", "selftest", "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 1
    answer = json.loads(out.stdout)
    assert (answer["selftest"], answer["version"]) == ("failed", VERSION)
    assert "ConfigError" in answer["error"]
    assert "not_a_key" in answer["error"]
