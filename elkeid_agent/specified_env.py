"""`<work_dir>/specified_env`: key=value lines the unit loads as environment (idc, region, id).

Written by `ctl set` and by task 1051; the agent reads it at start too, so values persisted by a
1051 hold across restarts even where no service manager loads the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from elkeid_agent.fsutil import atomic_write
from elkeid_agent.readcap import SMALL_FILE_BYTES, read_text_capped

FILE_NAME = "specified_env"


def parse(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.lstrip().startswith("#"):
            out[key.strip()] = value.strip().strip('"')
    return out


def read(work_dir: Path) -> dict[str, str]:
    try:
        return parse(read_text_capped(work_dir / FILE_NAME, SMALL_FILE_BYTES))
    except (OSError, UnicodeDecodeError):
        return {}


def update_lines(lines: list[str], values: Mapping[str, str]) -> list[str]:
    """Set (or, for an empty value, remove) keys in key=value lines; keep all others."""
    out: list[str] = []
    seen: set[str] = set()
    for line in lines:
        key = line.split("=", 1)[0].strip() if "=" in line else ""
        if key and key in values:
            seen.add(key)
            if values[key]:
                out.append(f"{key}={values[key]}")
            continue
        out.append(line)
    out.extend(f"{k}={v}" for k, v in values.items() if v and k not in seen)
    return out


def write(work_dir: Path, values: Mapping[str, str]) -> Path:
    """Update keys atomically, keeping every other line; OSError leaves the file as it was.

    Durable: a 1051 the server was told succeeded must hold after a power loss.
    """
    for key, value in values.items():
        if "\n" in value or "\0" in value:
            raise ValueError(f"{key} must be a single line without NUL")
    path = work_dir / FILE_NAME
    try:
        lines = read_text_capped(path, SMALL_FILE_BYTES).splitlines()
    except FileNotFoundError:
        lines = []
    text = "".join(line + "\n" for line in update_lines(lines, values))
    work_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.encode(), 0o644)
    return path
