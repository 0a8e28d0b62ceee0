"""Keys and signed artifacts for the signing tests (the signing tool's code, in memory)."""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from elkeid_agent.signing.keys import PinnedKey, sign


class TestKey:
    __test__ = False  # not a test class

    def __init__(self, not_after: datetime | None = None) -> None:
        key = Ed25519PrivateKey.generate()
        self.seed = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        self.public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.pinned = PinnedKey(self.public, not_after)

    @property
    def b64(self) -> str:
        return base64.b64encode(self.public).decode()

    def sign(self, data: bytes, name: str, version: str, allow_downgrade: bool = False) -> bytes:
        """`data` with its signature block appended."""
        return data + sign(self.seed, name, version, len(data),
                           hashlib.sha256(data).hexdigest(), allow_downgrade)


def tamper(signed: bytes, at: int = 20) -> bytes:
    """The same signed file with one content byte changed (the block left as it was)."""
    return signed[:at] + bytes([signed[at] ^ 0x01]) + signed[at + 1 :]
