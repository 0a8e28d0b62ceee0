"""Pinned publisher keys, the policy, and the verdict on one signed artifact.

Pure but for the Ed25519 arithmetic, which `cryptography` does; it is imported only when a
signature is checked or made, so `--version` and the upgrade guard never load it.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from elkeid_agent.signing.format import (
    Block,
    Metadata,
    encode_block,
    encode_metadata,
    key_id,
    signed_message,
)

PUBLIC_KEY_BYTES = 32


class Policy(enum.StrEnum):
    OFF = "off"  # nothing is checked: the Go agent's behaviour
    WARN = "warn"  # checked, a failure is logged and counted, the artifact is used
    ENFORCE = "enforce"  # checked, a failure refuses the artifact before it runs


@dataclass(frozen=True)
class PinnedKey:
    public_key: bytes  # 32 raw bytes
    not_after: datetime | None = None  # timezone-aware; None: no end

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)


def decode_public_key(text: str) -> bytes:
    """A key as written in the config: the base64 of its 32 raw bytes."""
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"public_key is not base64: {exc}") from None
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(f"public_key is {len(raw)} bytes, not {PUBLIC_KEY_BYTES} (Ed25519)")
    return raw


def problem(
    block: Block | None,
    content_sha256: str,
    keys: Sequence[PinnedKey],
    name: str,
    version: str,
    now: datetime,
) -> str | None:
    """Why the artifact is not what a pinned key says `name` `version` is; None if it is."""
    if block is None:
        return "unsigned"
    meta = block.metadata
    key = next((k for k in keys if k.key_id == meta.key_id), None)
    if key is None:
        return f"signed with unknown key {meta.key_id}"
    if key.not_after is not None and now > key.not_after:
        return f"signed with key {meta.key_id}, expired {key.not_after.isoformat()}"
    if not _valid(key.public_key, block.signature, signed_message(block.metadata_bytes)):
        return f"bad signature (key {meta.key_id})"
    if meta.sha256 != content_sha256:
        return "the content does not match its signature (changed after signing)"
    if meta.name != name or meta.version != version:
        return (f"signed for {meta.name!r} {meta.version!r}, "
                f"not {name!r} {version!r}")
    return None


def _valid(public_key: bytes, signature: bytes, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):  # ValueError: 32 bytes that are not a key
        return False
    return True


def sign(private_key: bytes, name: str, version: str, size: int, sha256: str,
         allow_downgrade: bool = False) -> bytes:
    """The block to append to content of `size` bytes hashing to `sha256` (the signing
    tool's side; `private_key` is the 32-byte Ed25519 seed)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.from_private_bytes(private_key)
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    metadata = encode_metadata(Metadata(key_id=key_id(public), name=name, version=version,
                                        size=size, sha256=sha256,
                                        allow_downgrade=allow_downgrade))
    return encode_block(metadata, key.sign(signed_message(metadata)))


def version_key(version: str) -> tuple[int, ...]:
    """Dotted versions compared by their numbers, as the Elkeid versions are (1.9.0.86)."""
    return tuple(int(n) for n in re.findall(r"\d+", version))


def is_downgrade(candidate: str, running: str) -> bool:
    return version_key(candidate) < version_key(running)
