"""Replacing files so that a SIGKILL at any instant leaves the old or the new one whole.

Every replacement is: write a complete copy beside the destination (same directory, so the
same filesystem), fsync it, `rename()` it over the destination, fsync the directory. rename
is atomic: the name points at the old inode until it points at the new, complete one. A
kill before the rename leaves a stray `.NAME.new` (removed by the next attempt); a kill
after it leaves the new file. So `/etc/elkeid/elkeid-agent` is never missing nor partial.

Also here: the upgrade record and quarantine files (same discipline), and which package
manager, if any, installed the executable.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path

from elkeid_agent.fsutil import atomic_write, fsync_dir, open_staging, publish, staging_path
from elkeid_agent.readcap import CONFIG_FILE_BYTES, FileTooLarge, read_capped
from elkeid_agent.upgrade.artifact import ArtifactKind
from elkeid_agent.upgrade.record import (
    OUTCOME_FILE,
    QUARANTINE_FILE,
    RECORD_FILE,
    CorruptFile,
    Outcome,
    Quarantine,
    UpgradeRecord,
    decode_outcome,
    decode_quarantine,
    decode_record,
    encode_outcome,
    encode_quarantine,
    encode_record,
)

COPY_CHUNK = 1024 * 1024


def copy_atomic(src: Path, dest: Path, mode: int) -> None:
    """Make `dest` a complete copy of `src` with `mode`, in one atomic step."""
    fd = open_staging(dest, mode)
    try:
        with src.open("rb") as source, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, COPY_CHUNK)
            out.flush()
            os.fchmod(out.fileno(), mode)  # the umask may have narrowed os.open's mode
            os.fsync(out.fileno())
        publish(dest)
    except BaseException:
        with contextlib.suppress(OSError):
            staging_path(dest).unlink()
        raise


def executable_mode(path: Path) -> int:
    """The permission bits to give a replacement of `path` (0700 if it is missing)."""
    try:
        return stat.S_IMODE(path.stat().st_mode) or 0o700
    except FileNotFoundError:
        return 0o700


# -- record and quarantine -------------------------------------------------------------------


def _read_state(path: Path) -> bytes:
    """One of the upgrade's JSON files; one over its cap does not decode (CorruptFile)."""
    try:
        return read_capped(path, CONFIG_FILE_BYTES)
    except FileTooLarge as exc:
        raise CorruptFile(f"{path.name}: {exc.strerror}") from exc


def read_record(work_dir: Path) -> UpgradeRecord | None:
    """The pending record, None if there is none; record.CorruptFile if it does not decode."""
    try:
        raw = _read_state(work_dir / RECORD_FILE)
    except FileNotFoundError:
        return None
    return decode_record(raw)


def write_record(work_dir: Path, record: UpgradeRecord) -> None:
    atomic_write(work_dir / RECORD_FILE, encode_record(record))


def remove_record(work_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (work_dir / RECORD_FILE).unlink()
        fsync_dir(work_dir)


def read_quarantine(work_dir: Path) -> Quarantine:
    """The quarantine list; empty if missing; record.CorruptFile if it does not decode."""
    try:
        raw = _read_state(work_dir / QUARANTINE_FILE)
    except FileNotFoundError:
        return Quarantine()
    return decode_quarantine(raw)


def write_quarantine(work_dir: Path, q: Quarantine) -> None:
    atomic_write(work_dir / QUARANTINE_FILE, encode_quarantine(q), 0o644)


def write_outcome(work_dir: Path, outcome: Outcome) -> None:
    atomic_write(work_dir / OUTCOME_FILE, encode_outcome(outcome), 0o644)


def read_outcome(work_dir: Path) -> Outcome | None:
    """The last upgrade's outcome; None if there is none; record.CorruptFile if it does not
    decode."""
    try:
        raw = _read_state(work_dir / OUTCOME_FILE)
    except FileNotFoundError:
        return None
    return decode_outcome(raw)


# -- package managers ------------------------------------------------------------------------

#: The query that says whether a path belongs to an installed package, per artifact kind.
OWNER_QUERY = {ArtifactKind.DEB: ("dpkg", "-S"), ArtifactKind.RPM: ("rpm", "-qf")}
INSTALL = {ArtifactKind.DEB: ("dpkg", "-i"), ArtifactKind.RPM: ("rpm", "-Uvh")}
SYSTEMD_RUNNING = Path("/run/systemd/system")


def find_tool(name: str, env: Mapping[str, str]) -> str | None:
    return shutil.which(name, path=env.get("PATH") or os.defpath)


def install_argv(kind: ArtifactKind, package: Path, env: Mapping[str, str],
                 unit: str) -> list[str] | None:
    """The package manager's install command for `package`, None without the tool.

    Under systemd it runs in a scope of its own (`systemd-run --scope`): the maintainer
    scripts restart the agent's service, and with KillMode=control-group a dpkg left in the
    agent's cgroup would be killed halfway through its own run. A scope keeps it our child,
    so its exit status still comes back to us when we live to see it.
    """
    tool, flag = INSTALL[kind]
    path = find_tool(tool, env)
    if path is None:
        return None
    command = [path, flag, str(package)]
    systemd_run = find_tool("systemd-run", env)
    if SYSTEMD_RUNNING.is_dir() and systemd_run is not None:
        return [systemd_run, "--quiet", "--scope", "--collect", f"--unit={unit}", *command]
    return command
