"""The agent's TOML config pointing at a local center (the schema of elkeid_agent.config,
which forbids unknown keys, so only keys it knows are written)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from elkeid_center.certs import SERVER_NAME, CertFiles

Compression = Literal["none", "gzip"]
REGION_KEYS = ("service_discovery", "private", "public")


def _toml_str(value: str | os.PathLike[str]) -> str:
    """A TOML basic string (JSON string escaping is valid TOML for these values)."""
    text = os.fspath(value)
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    if any(ord(c) < 0x20 for c in escaped):
        raise ValueError(f"control character in TOML value {text!r}")
    return f'"{escaped}"'


def write_agent_config(
    path: str | os.PathLike[str],
    work_dir: str | os.PathLike[str],
    certs_dir: str | os.PathLike[str],
    regions: Mapping[str, Mapping[str, str]] | None = None,
    *,
    compression: Compression = "none",
    buffer_bytes: int | None = None,
    signing_key: str | None = None,
    plugin_cgroup: str | None = None,
) -> Path:
    """Write the agent's TOML config and return its path.

    `regions` maps a region name to any of `service_discovery`, `private`, `public`
    ("host:port"); the agent needs at least one region, so it is required in practice
    (CenterThread.write_agent_config fills it in). `buffer_bytes`, when given, is
    written as `[buffer] max_bytes`. `signing_key` (base64 Ed25519 public key) is pinned
    with the signing policy `enforce`. `plugin_cgroup`, when given, is written as
    `[plugins] cgroup_name`: the group every agent sweeps at start and stop, so agents that
    share a host and a cgroup need one each.
    """
    if not regions:
        raise ValueError("at least one region with an address is needed")
    if compression not in ("none", "gzip"):
        raise ValueError(f"compression must be 'none' or 'gzip', not {compression!r}")
    certs = CertFiles(Path(certs_dir).resolve())
    lines = [
        f"work_dir = {_toml_str(Path(work_dir).resolve())}",
        "",
        "[tls]",
        f"ca = {_toml_str(certs.ca)}",
        f"cert = {_toml_str(certs.client_cert)}",
        f"key = {_toml_str(certs.client_key)}",
        f"server_name = {_toml_str(SERVER_NAME)}",
        "",
        "[transport]",
        f"compression = {_toml_str(compression)}",
    ]
    if buffer_bytes is not None:
        lines += ["", "[buffer]", f"max_bytes = {int(buffer_bytes)}"]
    if signing_key is not None:
        lines += ["", "[signing]", 'policy = "enforce"', "", "[[signing.keys]]",
                  f"public_key = {_toml_str(signing_key)}"]
    if plugin_cgroup is not None:
        lines += ["", "[plugins]", f"cgroup_name = {_toml_str(plugin_cgroup)}"]
    for name, addresses in regions.items():
        unknown = set(addresses) - set(REGION_KEYS)
        if unknown:
            raise ValueError(f"region {name!r}: unknown key(s) {sorted(unknown)}")
        key = name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _toml_str(name)
        lines += ["", f"[regions.{key}]"]
        lines += [f"{key} = {_toml_str(addresses[key])}" for key in REGION_KEYS if key in addresses]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out
