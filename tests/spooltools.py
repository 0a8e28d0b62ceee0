"""Helpers shared by the spool's end-to-end tests and bench/outage.py: the numbered plugin
served by a local center, and the tally of what it produced against what arrived."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elkeid_center.testing import CenterThread

REPO = Path(__file__).resolve().parent.parent
NUMBERED = REPO / "tests" / "plugins" / "bin" / "numbered.py"
FAST = {"heartbeat_interval": 0.5, "dial_timeout": 1.0, "backoff_initial": 0.2, "backoff_max": 1.0}


def numbered_plugin(
    center: CenterThread, files: Path, count_dir: Path, rate: int, pad: int = 200
) -> dict[str, Any]:
    """Publish the numbered plugin on the center's file server; its Config entry."""
    exe = (
        f"#!/bin/sh\nexport RATE='{rate}' PAD='{pad}' COUNT_DIR='{count_dir}'\n"
        f"export PYTHONPATH='{REPO}'\nexec '{sys.executable}' '{NUMBERED}' \"$@\"\n"
    ).encode()
    files.mkdir(parents=True, exist_ok=True)
    count_dir.mkdir(parents=True, exist_ok=True)
    (files / "numbered").write_bytes(exe)
    return {
        "name": "numbered",
        "version": "1.0.0",
        "sha256": hashlib.sha256(exe).hexdigest(),
        "download_urls": [center.file_url("numbered")],
    }


def produced(count_dir: Path) -> dict[str, int]:
    """Records each plugin process generated, by run (its pid)."""
    return {
        p.name: int(p.read_text() or 0)
        for p in count_dir.iterdir()
        if p.name.isdigit()
    }


@dataclass
class Tally:
    produced: int
    delivered: int  # unique
    duplicates: int

    @property
    def lost(self) -> int:
        return self.produced - self.delivered


def tally(center: CenterThread, count_dir: Path) -> Tally:
    made = produced(count_dir)
    seen: set[tuple[str, int]] = set()
    top: dict[str, int] = {}
    total = 0
    for record in center.records(9999):
        run, seq = record.fields.get("run"), record.fields.get("seq")
        if run is None or seq is None:
            continue
        seen.add((run, int(seq)))
        top[run] = max(top.get(run, 0), int(seq) + 1)
        total += 1
    # A run killed before its last count was saved: what arrived proves it produced that much.
    for run, n in top.items():
        made[run] = max(made.get(run, 0), n)
    return Tally(sum(made.values()), len(seen), total - len(seen))


def last_heartbeat(center: CenterThread) -> dict[str, str]:
    beats = center.records(1000)
    return beats[-1].fields if beats else {}
