"""Run a short-lived command with a deadline: the candidate's `--version` and `selftest`
probes, and dpkg/rpm for the package swap (thin I/O; the verdicts are the pure part).

The child is started with `os.posix_spawn` (never fork: gRPC's threads, see BUILD-FACTS) in
a process group of its own, because a frozen candidate runs as two or three processes
(staticx, PyInstaller's bootloader, Python): on the deadline, on cancellation, and after a
normal exit, the whole group is killed so no part of it lingers. Its output goes to a file,
capped: a candidate printing without end is killed once it passed the cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

from elkeid_agent.upgrade.selftest import OK, SelftestAnswer

#: What the probe keeps of the candidate's output (a version line is a few bytes).
MAX_OUTPUT_BYTES = 64 * 1024
#: How often the child's exit and output size are looked at.
POLL_SECONDS = 0.05
#: Exit statuses of a shell or launcher that could not execute the program.
CANNOT_EXECUTE = (126, 127)


@dataclass(frozen=True)
class RunResult:
    returncode: int | None  # None: killed at the deadline or for too much output
    output: str
    timed_out: bool = False
    too_much_output: bool = False
    exec_error: str = ""  # the spawn itself failed (wrong architecture, not executable)


class _Child:
    """One spawned child in its own process group (sync calls, each returns at once)."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], output: Path) -> None:
        self.output = output
        self.status: int | None = None
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            try:
                self.pid = os.posix_spawn(
                    argv[0],
                    list(argv),
                    dict(env),
                    file_actions=[
                        (os.POSIX_SPAWN_DUP2, devnull, 0),
                        (os.POSIX_SPAWN_DUP2, fd, 1),
                        (os.POSIX_SPAWN_DUP2, fd, 2),
                    ],
                    setpgroup=0,
                    setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
                )
            finally:
                os.close(devnull)
        finally:
            os.close(fd)

    def exited(self) -> bool:
        # waitid on this pid only: other children (plugins) are not ours to reap.
        done = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG)
        if done is None:
            return False
        self.status = done.si_status if done.si_code == os.CLD_EXITED else -done.si_status
        return True

    def output_size(self) -> int:
        return self.output.stat().st_size

    def finish(self) -> None:
        """Kill what is left of the group (leftovers of a normal exit too) and reap."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.status is None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)

    def read_output(self, limit: int) -> str:
        with self.output.open("rb") as fh:
            return fh.read(limit).decode("utf-8", "replace")


async def run_bounded(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    timeout: float,  # noqa: ASYNC109 - the deadline also kills the child's process group
    output: Path,
    max_output: int = MAX_OUTPUT_BYTES,
    survive_cancel: bool = False,
) -> RunResult:
    """Run `argv` (argv[0] a path), stdout and stderr into `output`, for at most `timeout`.

    `survive_cancel`: if we are cancelled (the agent is stopping), leave the child running.
    For dpkg/rpm, whose maintainer scripts restart the agent while they run: killing them
    then would leave a half-configured package.
    """
    try:
        child = _Child(argv, env, output)
    except OSError as exc:
        hint = " (built for another architecture?)" if exc.errno == errno.ENOEXEC else ""
        return RunResult(None, "", exec_error=f"cannot execute: {exc.strerror}{hint}")
    timed_out = too_much = False
    deadline = time.monotonic() + timeout
    try:
        while not child.exited():
            if time.monotonic() >= deadline:
                timed_out = True
                break
            if child.output_size() > max_output:
                too_much = True
                break
            await asyncio.sleep(POLL_SECONDS)
    except asyncio.CancelledError:
        if not survive_cancel:
            child.finish()
        raise
    child.finish()
    return RunResult(
        None if timed_out or too_much else child.status,
        child.read_output(max_output),
        timed_out=timed_out,
        too_much_output=too_much,
    )


#: ELF e_machine values of the architectures Elkeid hosts run, for messages.
ELF_MACHINES = {3: "x86", 8: "mips", 20: "ppc", 21: "ppc64", 22: "s390x", 40: "arm",
                62: "x86-64", 183: "aarch64", 243: "riscv64", 258: "loongarch64"}
ELF_HEAD_BYTES = 20


def elf_machine(head: bytes) -> int | None:
    """The e_machine of an ELF file from its first 20 bytes; None if it is not ELF."""
    if len(head) < ELF_HEAD_BYTES or not head.startswith(b"\x7fELF"):
        return None
    order = "<" if head[5] == 1 else ">"
    machine: int = struct.unpack_from(order + "H", head, 18)[0]
    return machine


def architecture_verdict(candidate_head: bytes, own_head: bytes) -> str | None:
    """Why the candidate cannot be ours (None: same machine, or not both ELF).

    Checked before the probe runs: a host with qemu registered in binfmt_misc would run a
    foreign executable under emulation, and its `--version` would pass.
    """
    theirs, ours = elf_machine(candidate_head), elf_machine(own_head)
    if theirs is None or ours is None or theirs == ours:
        return None
    return (f"built for {ELF_MACHINES.get(theirs, f'machine {theirs}')}, this agent runs on "
            f"{ELF_MACHINES.get(ours, f'machine {ours}')}")


def probe_verdict(result: RunResult, expected: str, timeout: float) -> str | None:
    """Why the probe failed, or None when the candidate printed exactly `expected`."""
    if result.exec_error:
        return result.exec_error
    if result.timed_out:
        return f"--version did not finish within {timeout:g} s"
    if result.too_much_output:
        return "--version printed too much"
    if result.returncode in CANNOT_EXECUTE:
        return (f"cannot execute (exit {result.returncode}, built for another architecture?): "
                f"{_snippet(result.output)}")
    if result.returncode != 0:
        return f"--version exited with {result.returncode}: {_snippet(result.output)}"
    printed = result.output.strip()
    if printed != expected:
        return f"--version printed {_snippet(printed)!r}, expected {expected!r}"
    return None


def selftest_verdict(result: RunResult, expected: str, timeout: float) -> str | None:
    """Why `<candidate> selftest` failed, or None when it answered ok for `expected`.

    The answer is the last line of the output that decodes as the selftest's JSON object
    (warnings may precede it on stderr, which shares the output file)."""
    if result.exec_error:
        return f"selftest: {result.exec_error}"
    if result.timed_out:
        return f"selftest did not finish within {timeout:g} s"
    if result.too_much_output:
        return "selftest printed too much"
    answer = _selftest_answer(result.output)
    if answer is None:
        return (f"selftest exited with {result.returncode} without an answer: "
                f"{_snippet(result.output)}")
    if answer.version != expected:
        return f"selftest answered for version {_snippet(answer.version)!r}, expected {expected!r}"
    if answer.selftest != OK or result.returncode != 0:
        error = _snippet(answer.error) or _snippet(result.output)
        return f"selftest failed (exit {result.returncode}): {error}"
    return None


def _selftest_answer(output: str) -> SelftestAnswer | None:
    for raw in reversed(output.splitlines()):
        line = raw.strip()
        if not line.startswith("{"):
            continue
        try:
            return msgspec.json.decode(line, type=SelftestAnswer)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
    return None


def _snippet(text: str, limit: int = 200) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + "..."
