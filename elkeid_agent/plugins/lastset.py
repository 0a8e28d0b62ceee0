"""The last plugin Config set applied, kept on disk so that a restarted agent resumes
monitoring before any server answers.

`<work_dir>/plugin-configs.json` is replaced atomically after each applied set. At start-up
the set is handed to the plugin sync with its download URLs removed: a plugin starts only from
the executable already installed and matching its hash, nothing is fetched. The server's set
replaces it as soon as it arrives (same versions keep running, without a restart).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import msgspec

from elkeid_agent.commands import ConfigSpec
from elkeid_agent.fsutil import atomic_write
from elkeid_agent.readcap import read_capped

log = logging.getLogger(__name__)

LAST_SET_FILE = "plugin-configs.json"
#: At most 64 plugins of a 10 MiB Command: their JSON stays well under this.
MAX_BYTES = 16 * 1024 * 1024


def save(work_dir: Path, configs: Sequence[ConfigSpec]) -> None:
    """Persist the set (OSError to the caller: one file write is its own unit of failure)."""
    atomic_write(Path(work_dir) / LAST_SET_FILE, msgspec.json.encode(list(configs)))


def load(work_dir: Path) -> list[ConfigSpec]:
    """The persisted set for an offline start: no download URLs; [] if none or unreadable."""
    path = Path(work_dir) / LAST_SET_FILE
    try:
        configs = msgspec.json.decode(read_capped(path, MAX_BYTES), type=list[ConfigSpec])
    except FileNotFoundError:
        return []
    except (OSError, msgspec.DecodeError) as exc:  # FileTooLarge is an OSError
        log.error("%s: ignored: %s", path, exc)
        return []
    return [msgspec.structs.replace(c, download_urls=()) for c in configs]
