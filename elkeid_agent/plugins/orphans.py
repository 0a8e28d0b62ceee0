"""Plugin process groups that outlive a hard-killed agent (Elkeid issue 10), found and killed.

The supervisor rewrites `<work_dir>/plugin/.pgids` whenever a plugin starts or ends: one JSON
object per line with the group id, the leader's start time in clock ticks since boot
(/proc/<pid>/stat field 22), the boot id, and the plugin directory. On the next start, every
process of a recorded group is killed if /proc shows it is still that plugin:

* same boot (`/proc/sys/kernel/random/boot_id`), else nothing recorded can still run;
* the leader itself: pid, group and start time all equal what was recorded (a reused pid has a
  later start time);
* another member of the group (the leader may be gone): started no earlier than the leader,
  and its executable or working directory lies in the plugin directory.

Parsing is pure (`parse_stat`, `is_plugin_process`); `reap` is the thin I/O around it.
No fsync for the file (`durable=False`): it only matters while the host stays up (a reboot
ends every recorded group), and the page cache survives the agent's death. A failed write (a
full or read-only disk) is a Health fault under `GROUPS_UNIT`, cleared by the next write that
succeeds; the plugins run on, only the clean-up after a hard kill is at risk meanwhile.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from elkeid_agent.fsutil import atomic_write, describe_error
from elkeid_agent.health import Health
from elkeid_agent.readcap import SMALL_FILE_BYTES, read_text_capped

log = logging.getLogger(__name__)

PGIDS_FILE = ".pgids"
#: One line per running plugin (at most 64), ~150 bytes each.
PGIDS_BYTES = 1024 * 1024
#: The Health unit of a failed write of the records.
GROUPS_UNIT = "plugin groups file"


@dataclass(frozen=True)
class GroupRecord:
    pgid: int
    start_ticks: int
    boot_id: str
    directory: str


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    pgid: int
    start_ticks: int
    exe: str
    cwd: str


def parse_stat(text: str) -> tuple[int, int]:
    """(process group, start time in ticks) from the text of /proc/<pid>/stat."""
    # comm (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    rest = text[text.rindex(")") + 2 :].split()
    return int(rest[2]), int(rest[19])


def _inside(path: str, directory: str) -> bool:
    path = path.removesuffix(" (deleted)")
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def is_plugin_process(proc: ProcInfo, record: GroupRecord) -> bool:
    """Whether `proc` is (still) a process of the recorded plugin group."""
    if proc.pgid != record.pgid:
        return False
    if proc.pid == record.pgid:
        return proc.start_ticks == record.start_ticks
    return proc.start_ticks >= record.start_ticks and (
        _inside(proc.exe, record.directory) or _inside(proc.cwd, record.directory)
    )


def boot_id(proc_root: Path = Path("/proc")) -> str:
    return read_text_capped(proc_root / "sys/kernel/random/boot_id", SMALL_FILE_BYTES).strip()


def read_proc(pid: int, proc_root: Path = Path("/proc")) -> ProcInfo | None:
    """ProcInfo of a live pid, or None when it is gone or unreadable."""
    base = proc_root / str(pid)
    try:
        pgid, start = parse_stat(read_text_capped(base / "stat", SMALL_FILE_BYTES, "replace"))
    except (OSError, ValueError, IndexError):
        return None
    exe = cwd = ""
    try:
        exe = os.readlink(base / "exe")
        cwd = os.readlink(base / "cwd")
    except OSError:
        pass  # a zombie or a kernel thread: the leader rule alone decides
    return ProcInfo(pid, pgid, start, exe, cwd)


def record_for(pid: int, directory: Path, proc_root: Path = Path("/proc")) -> GroupRecord | None:
    info = read_proc(pid, proc_root)
    if info is None:
        return None
    return GroupRecord(pid, info.start_ticks, boot_id(proc_root), str(directory))


def save(path: Path, records: Iterable[GroupRecord], health: Health | None = None) -> bool:
    """Replace the file atomically (a torn file would lose every record).

    With `health`, a failure is recorded there and False returned; without, OSError raises.
    """
    data = "".join(json.dumps(asdict(r)) + "\n" for r in records).encode()
    try:
        atomic_write(path, data, 0o644, durable=False)
    except OSError as exc:
        if health is None:
            raise
        health.fault(GROUPS_UNIT, "cannot record plugin groups: " + describe_error(path, exc))
        return False
    if health is not None:
        health.clear(GROUPS_UNIT)
    return True


def load(path: Path) -> list[GroupRecord]:
    try:
        lines = read_text_capped(path, PGIDS_BYTES).splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:  # unreadable or not text: nothing to trust
        log.warning("ignoring %s: %s", path, exc)
        return []
    out = []
    for line in lines:
        try:
            out.append(GroupRecord(**json.loads(line)))
        except (ValueError, TypeError, RecursionError):  # RecursionError: deeply nested JSON
            log.warning("ignoring a bad line in %s: %r", path, line[:200])
    return out


def reap(path: Path, proc_root: Path = Path("/proc")) -> list[int]:
    """Kill what is left of the recorded groups; returns the pids signalled."""
    records = load(path)
    if not records:
        return []
    current_boot = boot_id(proc_root)
    records = [r for r in records if r.boot_id == current_boot]
    killed: list[int] = []
    if records:
        pids = (int(p.name) for p in proc_root.iterdir() if p.name.isdigit())
        for pid in pids:
            info = read_proc(pid, proc_root)
            if info is None:
                continue
            for record in records:
                if is_plugin_process(info, record):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    killed.append(pid)
                    log.warning(
                        "killed pid %d left over from a previous agent (plugin %s)",
                        pid,
                        record.directory,
                    )
                    break
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        # A read-only disk: the records stay and are checked again (harmlessly) next start.
        log.warning("cannot remove %s: %s", path, exc)
    return killed
