"""The last heartbeats, kept on disk for `elkeid-agent diagnostics`: `<work_dir>/heartbeats.json`.

A ring of RING_SIZE entries (the agent heartbeat's fields, redacted as sent, and each plugin's
state, redacted here), each value cut at MAX_VALUE characters, so the file stays under ~100 KiB
whatever a state_detail holds. The agent rewrites it at each heartbeat in a worker thread,
atomically and without fsync (it describes a live process); 0600, as it names hosts, paths and
reasons.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from elkeid_agent.fsutil import atomic_write
from elkeid_agent.redact import redact

RING_FILE = "heartbeats.json"
RING_SIZE = 10
MAX_VALUE = 4096


class HeartbeatRing:
    def __init__(self, size: int = RING_SIZE) -> None:
        self._entries: deque[dict[str, Any]] = deque(maxlen=size)

    def add(self, at: float, fields: Mapping[str, str],
            plugins: Sequence[Mapping[str, str | int]]) -> None:
        self._entries.append({
            "time": at,
            "fields": {k: v[:MAX_VALUE] for k, v in fields.items()},
            "plugins": [
                # A plugin's last_exit quotes its stderr, which may hold a URL's password.
                {k: redact(v)[:MAX_VALUE] if isinstance(v, str) else v for k, v in p.items()}
                for p in plugins
            ],
        })

    def encode(self) -> bytes:
        return msgspec.json.encode(list(self._entries))


def write_ring(work_dir: Path, data: bytes) -> None:
    atomic_write(work_dir / RING_FILE, data, 0o600, durable=False)


def read_ring(work_dir: Path, max_bytes: int) -> list[dict[str, Any]]:
    """The entries on disk, oldest first; [] when there is no file or it does not parse."""
    try:
        with (work_dir / RING_FILE).open("rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError:
        return []
    if len(data) > max_bytes:
        return []
    try:
        entries = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return []
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
