"""Running agent processes, found in /proc however they were started.

`ctl cleanup` must not empty the directories of an agent run by hand or by another supervisor
(not only systemd's), and `ctl status` must find a running agent whose status file is missing
(a read-only work dir) or whose recorded pid now belongs to another program. An agent is
recognised by its command line: the executable `elkeid-agent` (packaged, frozen or a venv's
script) or `python -m elkeid_agent`, running the agent itself (no subcommand, or `run`); its
work dir is the one its `--config` names (relative to its cwd), read leniently.
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path

from elkeid_agent.config import DEFAULT_CONFIG_PATH, Config

PROGRAM = "elkeid-agent"
MODULE = "elkeid_agent"
# Python options that take a value as the next word (`python -X dev -m elkeid_agent`).
_PYTHON_VALUE_OPTS = frozenset({"-X", "-W", "-Q"})
_NOT_RUNNING = frozenset({"--version", "-h", "--help"})
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class AgentProc:
    pid: int
    ppid: int
    uid: int
    started: float  # the process's start time, as status.json records it
    work_dir: Path | None  # None: its config could not be located (no access to its cwd)
    cmdline: tuple[str, ...]


def _program_args(cmdline: list[str]) -> list[str] | None:
    """The words after the agent's program in `cmdline`, or None when it is not the agent."""
    if not cmdline:
        return None
    first = Path(cmdline[0]).name
    if first.startswith(PROGRAM):
        return cmdline[1:]
    if not first.startswith("python"):
        return None
    i = 1
    while i < len(cmdline):
        word = cmdline[i]
        if word == "-m":
            return cmdline[i + 2:] if cmdline[i + 1:i + 2] == [MODULE] else None
        if word in _PYTHON_VALUE_OPTS:
            i += 2
            continue
        if word.startswith("-"):
            if word.startswith("-c"):
                return None
            i += 1
            continue
        return cmdline[i + 1:] if Path(word).name.startswith(PROGRAM) else None
    return None


def agent_run_args(cmdline: list[str]) -> list[str] | None:
    """The agent's own arguments when `cmdline` runs the agent (not `ctl`, `doctor`, ...)."""
    args = _program_args(cmdline)
    if args is None:
        return None
    skip = False
    for word in args:
        if skip:
            skip = False
        elif word == "--config":
            skip = True
        elif word in _NOT_RUNNING:
            return None
        elif not word.startswith("-"):
            return args if word == "run" else None
    return args


def config_arg(args: list[str]) -> str | None:
    """The value of `--config` among the agent's arguments, None without one."""
    for i, word in enumerate(args):
        if word == "--config" and i + 1 < len(args):
            return args[i + 1]
        if word.startswith("--config="):
            return word.removeprefix("--config=")
    return None


def _work_dir_of(config: str | None) -> Path | None:
    """The work dir a config names, read leniently; None when the file is not a
    small regular file. Any user may start a process whose command line names a FIFO or
    /dev/zero: only a regular file is ever opened for reading, and read bounded."""
    path = str(DEFAULT_CONFIG_PATH) if config is None else config
    try:
        # O_PATH opens nothing: opening a device has effects of its own (/dev/watchdog arms
        # the reboot timer, a tape rewinds), so only the checked regular file is reopened,
        # through its descriptor (the same inode, whatever the path names meanwhile).
        handle = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        # No config file: `run` uses its defaults, or refuses a --config that is missing.
        return Path(os.path.realpath(Config().work_dir)) if config is None else None
    except OSError:
        return None
    try:
        st = os.fstat(handle)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CONFIG_BYTES:
            return None
        fd = os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            data = os.read(fd, MAX_CONFIG_BYTES)
        finally:
            os.close(fd)
    except OSError:
        return None
    finally:
        os.close(handle)
    try:
        value = tomllib.loads(data.decode()).get("work_dir")
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):  # nested deeply
        value = None
    work_dir = value if isinstance(value, str) and value else Config().work_dir
    try:
        return Path(os.path.realpath(work_dir))
    except ValueError:  # a NUL in the string: no path, and no agent could run there
        return None


def running_agents() -> list[AgentProc]:
    """Every agent process alive on this host (this process excluded), in pid order."""
    import psutil  # here: `--version` imports ctl, which imports this module

    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            cmdline = proc.cmdline()
            args = agent_run_args(cmdline)
            if args is None or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            started, ppid, uid = proc.create_time(), proc.ppid(), proc.uids().real
            config = config_arg(args)
            try:
                if config is not None and not os.path.isabs(config):
                    config = os.path.join(proc.cwd(), config)
            except psutil.AccessDenied:
                work_dir = None
            else:
                work_dir = _work_dir_of(config)
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
        found.append(AgentProc(proc.pid, ppid, uid, started, work_dir, tuple(cmdline)))
    return found


def agents_of(work_dir: Path, agents: list[AgentProc]) -> list[AgentProc]:
    """The agents that run in `work_dir`, or may (their work dir is unknown).

    A frozen agent is two processes with the same command line (the bootloader and the
    program it unpacked); only the innermost of such a chain is kept.
    """
    target = Path(os.path.realpath(work_dir))
    mine = [a for a in agents if a.work_dir is None or a.work_dir == target]
    parents = {a.ppid for a in mine}
    return [a for a in mine if a.pid not in parents]


def describe_pid(pid: int) -> str:
    """What program `pid` is now, for a record whose process is gone: `name (cmdline)`."""
    import psutil

    try:
        proc = psutil.Process(pid)
        words = " ".join(proc.cmdline())
        name = proc.name()
    except psutil.NoSuchProcess:
        return "no process"
    except psutil.Error:
        return "a process this user cannot inspect"
    if len(words) > 120:
        words = words[:117] + "..."
    return f"{name} ({words})" if words else name
