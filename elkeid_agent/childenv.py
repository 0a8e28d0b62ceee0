"""The environment of every process the agent starts: plugins, dpkg, rpm, upgrade probes.

The frozen executable runs under two launchers that set variables for themselves:

* staticx (the outer, static layer) unpacks its bundle (a glibc and the libraries the
  program needs) and exports `STATICX_BUNDLE_DIR` and `STATICX_PROG_PATH`; a
  `LD_LIBRARY_PATH` it leaves behind points into that bundle.
* PyInstaller's onefile bootloader unpacks the Python runtime into a `_MEIxxxxxx`
  directory, points `LD_LIBRARY_PATH` at it (saving the value it found in
  `LD_LIBRARY_PATH_ORIG`) and passes its state to the Python process in `_MEI*`,
  `_PYI*` and `_PYIBoot*` variables.

A child that inherits these loads the bundle's libraries instead of the host's (dpkg
linked against the host's libc then fails, or worse, half works), and a new agent
executable started for its `--version` probe takes the running agent's unpack
directory for its own. So children get the environment the agent itself was started
with: `LD_LIBRARY_PATH` as it was before the launchers (without any entry inside a
launcher's directory), and none of the launchers' variables.

The service manager's variables are the agent's alone too: with `NOTIFY_SOCKET` (and
NotifyAccess=all) a plugin could send WATCHDOG=1 for a hung agent or READY/STOPPING in its
name; `WATCHDOG_USEC`/`WATCHDOG_PID` and socket activation's `LISTEN_FDS`/`LISTEN_PID`/
`LISTEN_FDNAMES` describe the agent's process, not the child's.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

# Prefixes of variables that only the launchers and their Python child, or the agent itself
# as the service manager's main process, may see.
_PRIVATE_PREFIXES = ("_MEI", "_PYI", "_PYIBoot", "STATICX_", "WATCHDOG_", "LISTEN_")
_LD_PATH = "LD_LIBRARY_PATH"
_LD_PATH_ORIG = "LD_LIBRARY_PATH_ORIG"
# Dropped by name; LD_LIBRARY_PATH is put back below, cleaned.
_DROPPED = (_LD_PATH, _LD_PATH_ORIG, "NOTIFY_SOCKET")


def _launcher_dirs(env: Mapping[str, str]) -> list[str]:
    """Directories whose libraries belong to the launchers, not to the host."""
    dirs = [
        env.get("STATICX_BUNDLE_DIR", ""),
        env.get("_MEIPASS2", ""),
        env.get("_PYI_APPLICATION_HOME_DIR", ""),
        # The running bundle's own unpack dir, also when `base` is not our environment.
        getattr(sys, "_MEIPASS", ""),
    ]
    return [os.path.normpath(d) for d in dirs if d]


def _inside(path: str, dirs: list[str]) -> bool:
    norm = os.path.normpath(path)
    return any(norm == d or norm.startswith(d + os.sep) for d in dirs)


def child_env(
    base: Mapping[str, str] | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Return the environment for a child process.

    `base` defaults to the agent's own environment; `extra` is applied last, so a caller
    may still set `LD_LIBRARY_PATH` deliberately.
    """
    src = dict(os.environ if base is None else base)
    launcher_dirs = _launcher_dirs(src)
    ld_path = src.get(_LD_PATH_ORIG) if _LD_PATH_ORIG in src else src.get(_LD_PATH)
    env = {
        k: v
        for k, v in src.items()
        if not k.startswith(_PRIVATE_PREFIXES) and k not in _DROPPED
    }
    if ld_path:
        # The saved value can itself carry the staticx bundle dir (staticx ran first).
        kept = [p for p in ld_path.split(os.pathsep) if p and not _inside(p, launcher_dirs)]
        if kept:
            env[_LD_PATH] = os.pathsep.join(kept)
    if extra:
        env.update(extra)
    return env
