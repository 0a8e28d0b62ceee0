"""Leftover unpack directories of the frozen executable.

Every start of the executable unpacks twice under `TMPDIR` (the unit sets it to
`/etc/elkeid/tmp`): staticx into `staticx-XXXXXX` (about 25 MB) and PyInstaller into
`_MEIxxxxxx` (about 50 MB). Both launchers delete their directory on a normal exit and
on SIGTERM, but not after SIGKILL (systemd's final kill, the OOM killer, a watchdog
abort), so without cleaning each such restart would leave 75 MB behind.

A directory is left alone while any process still uses it (maps a file from it, runs
an executable from it or has its cwd in it: a concurrent `elkeid-agent ctl` or
`--version` probe shares the same `TMPDIR`), and while it is young, because another
starting process may have created it and not yet mapped anything from it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from elkeid_agent.fsutil import remove_tree

log = logging.getLogger(__name__)

UNPACK_PREFIXES = ("_MEI", "staticx-")
# A launcher maps files from its new directory within seconds of creating it (~5 s under
# the unit's 10 % CPU quota), and writing into it keeps its mtime fresh until then. Below
# the unit's RestartSec (45 s), so a restart after SIGKILL clears its predecessor's dirs.
MIN_AGE_S = 30.0


def _own_dirs() -> set[Path]:
    dirs = {
        os.environ.get("STATICX_BUNDLE_DIR", ""),
        os.environ.get("_PYI_APPLICATION_HOME_DIR", ""),
        getattr(sys, "_MEIPASS", ""),
    }
    return {Path(d).resolve() for d in dirs if d}


def _paths_in_use(tmp_dir: Path, proc: Path) -> set[str]:
    """Top-level names under tmp_dir that some process maps, executes or sits in."""
    prefix = str(tmp_dir) + "/"
    used: set[str] = set()

    def note(path: str) -> None:
        if path.startswith(prefix):
            used.add(path[len(prefix) :].split("/", 1)[0])

    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        for link in ("exe", "cwd"):
            try:
                note(os.readlink(pid_dir / link))
            except OSError:
                continue
        # Line by line: a large process (a JVM) has tens of thousands of mappings, and each
        # line is short (a path is at most PATH_MAX).
        try:
            with open(pid_dir / "maps", encoding="utf-8", errors="replace") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6:
                        note(fields[5].rstrip("\n"))
        except OSError:
            continue
    return used


def clean_stale_unpack_dirs(tmp_dir: Path, *, proc: Path = Path("/proc")) -> int:
    """Remove unpack directories in tmp_dir that no process uses; return how many."""
    now = time.time()
    try:
        tmp_dir = tmp_dir.resolve(strict=True)
        candidates = [
            p
            for p in tmp_dir.iterdir()
            if p.name.startswith(UNPACK_PREFIXES)
            and not p.is_symlink()
            and p.is_dir()
            and now - p.lstat().st_mtime >= MIN_AGE_S
        ]
    except OSError:
        return 0
    if not candidates:
        # The common start: skip reading every process's maps.
        return 0
    in_use = _paths_in_use(tmp_dir, proc)
    own = _own_dirs()
    removed = 0
    for path in candidates:
        try:
            if path.name in in_use or path.resolve() in own:
                continue
            remove_tree(path)
        except OSError as exc:
            log.warning("cannot remove stale unpack dir %s: %s", path, exc)
            continue
        removed += 1
    if removed:
        log.info("removed %d stale unpack dirs from %s", removed, tmp_dir)
    return removed
