"""The agent id, derived exactly as the Go agent does (PROTOCOL section 6, "Agent id").

The server keys a host's history by this id, so on a host the Go agent already ran on we
must produce the same string. Everything is read through a root path so tests build a fake
tree: a host path ``/x/y`` is read as ``root / "x/y"`` (see :func:`host.under_root`).

``work_dir`` is the agent's working directory as an absolute *host* path (``/etc/elkeid``);
its ``machine-id`` is read and written under ``root`` like every other host path.

Differences from the Go agent, all of them fixes that keep its ids where it produced any:
- an empty ``SPECIFIED_AGENT_ID`` counts as unset (Go would use the empty string);
- ``specified_id`` (what the Go control tool writes) is accepted as well;
- a bad or missing ``product_name`` falls through to ``/etc/machine-id`` (Go returns "");
- a ``product_name`` shorter than 6 bytes counts as good (Go's reader rejects it and the
  Go agent returns "").
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Mapping
from pathlib import Path

from elkeid_agent.fsutil import atomic_write, describe_error
from elkeid_agent.health import Health
from elkeid_agent.host import under_root
from elkeid_agent.readcap import SMALL_FILE_BYTES, read_capped

log = logging.getLogger(__name__)

ENV_KEYS = ("SPECIFIED_AGENT_ID", "specified_id")
ID_FILE = "machine-id"

_INSTANCE_ID = "/var/lib/cloud/data/instance-id"
_PRODUCT_UUID = "/sys/class/dmi/id/product_uuid"
_ETH0_ADDRESS = "/sys/class/net/eth0/address"
_PRODUCT_NAME = "/sys/class/dmi/id/product_name"
_MACHINE_ID = "/etc/machine-id"

# Firmware placeholders shared by many machines: never an identity.
BAD_PRODUCT_UUIDS = frozenset(
    {b"03000200-0400-0500-0006-000700080009", b"02000100-0300-0400-0005-000600070008"}
)
BAD_PRODUCT_NAMES = frozenset(
    {b"--", b"unknown", b"To be filled by O.E.M.", b"OEM not specify"}
)
# Go's reader (fromIDFile) rejects files whose raw content is shorter than this.
MIN_ID_FILE_BYTES = 6
# Go uses the hardware source only when the concatenation is longer than 8 bytes.
MIN_SOURCE_BYTES = 9

_HEX = frozenset(b"0123456789abcdefABCDEF")


class _BadFormat(ValueError):
    """The right length for a UUID but not its format (Go: "invalid UUID format")."""


def _read(path: Path) -> bytes | None:
    try:
        return read_capped(path, SMALL_FILE_BYTES)
    except OSError:
        return None


def _read_id_file(path: Path) -> bytes | None:
    """Go's fromIDFile: trimmed content, or None if unreadable or shorter than 6 raw bytes."""
    raw = _read(path)
    if raw is None or len(raw) < MIN_ID_FILE_BYTES:
        return None
    # bytes.strip() trims the same ASCII set as Go's bytes.TrimSpace.
    return raw.strip()


def parse_go_uuid(text: bytes) -> uuid.UUID:
    """Parse like github.com/google/uuid ParseBytes (v1.3).

    Accepts 32 hex digits, the dashed form, ``{dashed}`` and ``urn:uuid:dashed``.
    Raises :class:`_BadFormat` where Go says "invalid UUID format" (right length, wrong
    characters) and plain ValueError for the other errors (length, urn prefix).
    """
    if len(text) == 32:
        if not set(text) <= _HEX:
            raise _BadFormat(text)
        return uuid.UUID(hex=text.decode("ascii"))
    if len(text) == 36 + 9:
        if text[:9].lower() != b"urn:uuid:":
            raise ValueError(f"invalid urn prefix: {text[:9]!r}")
        text = text[9:]
    elif len(text) == 36 + 2:
        text = text[1:]  # Go does not check the braces themselves
    elif len(text) != 36:
        raise ValueError(f"invalid UUID length: {len(text)}")
    if any(text[i] != ord("-") for i in (8, 13, 18, 23)):
        raise _BadFormat(text)
    digits = text[0:8] + text[9:13] + text[14:18] + text[19:23] + text[24:36]
    if not set(digits) <= _HEX:
        raise _BadFormat(text)
    return uuid.UUID(hex=digits.decode("ascii"))


def uuid5_oid(name: bytes) -> uuid.UUID:
    """Go's uuid.NewSHA1(uuid.NameSpaceOID, name), taking raw bytes (py3.11 uuid5 cannot)."""
    digest = hashlib.sha1(uuid.NAMESPACE_OID.bytes + name, usedforsecurity=False).digest()
    return uuid.UUID(bytes=digest[:16], version=5)


def _good_product_name(name: bytes | None) -> bool:
    return (
        name is not None
        and name != b""
        and name not in BAD_PRODUCT_NAMES
        and name.lower() != b"t.b.d"
    )


def _from_hardware(root: Path) -> str | None:
    """Steps 2 and 3: UUIDv5 over instance-id + product_uuid + eth0 MAC."""
    parts = [
        _read_id_file(under_root(root, path))
        for path in (_INSTANCE_ID, _PRODUCT_UUID, _ETH0_ADDRESS)
    ]
    source = b"".join(p for p in parts if p is not None)
    product_uuid = parts[1]
    if len(source) < MIN_SOURCE_BYTES or product_uuid in BAD_PRODUCT_UUIDS:
        return None
    product_name = _read(under_root(root, _PRODUCT_NAME))
    if not _good_product_name(None if product_name is None else product_name.strip()):
        return None
    return str(uuid5_oid(source))


def _from_machine_id(root: Path) -> str | None:
    """Step 4: /etc/machine-id as a UUID, or hashed when it has a UUID's length only."""
    raw = _read(under_root(root, _MACHINE_ID))
    if raw is None:
        return None
    try:
        return str(parse_go_uuid(raw.strip()))
    except _BadFormat:
        return str(uuid5_oid(raw.strip()))
    except ValueError:
        return None


def _from_saved(saved: Path) -> str | None:
    """Step 5: the id a previous run saved in <work_dir>/machine-id."""
    raw = _read(saved)
    if raw is None:
        return None
    try:
        return str(parse_go_uuid(raw.strip()))
    except ValueError:
        return None


def derive_agent_id(root: Path, work_dir: Path, env: Mapping[str, str]) -> str:
    """The agent id by PROTOCOL section 6 steps 1-6; ``work_dir`` is an absolute host path."""
    saved = under_root(root, work_dir) / ID_FILE
    for key in ENV_KEYS:
        if env.get(key):
            return env[key]
    return (
        _from_hardware(root)
        or _from_machine_id(root)
        or _from_saved(saved)
        or str(uuid.uuid4())
    )


#: The Health unit of a machine-id that could not be saved.
ID_FILE_UNIT = "machine-id file"


def write_id_file(directory: Path, agent_id: str) -> None:
    """Atomically replace <directory>/machine-id with ``agent_id``, mode 0600.

    Durable: a random id lost to a power cut would come back as another host to the server.
    """
    atomic_write(directory / ID_FILE, agent_id.encode(), 0o600)  # no newline, like Go


def save_agent_id(root: Path, work_dir: Path, agent_id: str, health: Health) -> bool:
    """Persist the id unless the file already holds it; a failure is a Health fault only.

    The id is used for this run either way; the caller retries while the fault stands, and
    the first write that succeeds clears it.
    """
    directory = under_root(root, work_dir)
    if (_read(directory / ID_FILE) or b"").strip() == agent_id.encode():
        health.clear(ID_FILE_UNIT)
        return True
    try:
        write_id_file(directory, agent_id)
    except OSError as exc:
        health.fault(ID_FILE_UNIT, "cannot save: " + describe_error(work_dir / ID_FILE, exc))
        return False
    health.clear(ID_FILE_UNIT)
    return True


def load_agent_id(
    root: Path, work_dir: Path, env: Mapping[str, str], health: Health | None = None
) -> str:
    """Derive the id and save it to <work_dir>/machine-id, so a random id stays stable.

    A failed write is a fault in ``health``, not an exception: the agent runs with the id
    it derived.
    """
    agent_id = derive_agent_id(root, work_dir, env)
    save_agent_id(root, work_dir, agent_id, health if health is not None else Health())
    return agent_id
