"""The signature block appended to an artifact (pure: bytes in, values out).

In the manner of Linux kernel module signing, the signature travels at the end of the file
it signs, so the unmodified Elkeid server and its upload page carry it as part of the file:

    content (N bytes) | metadata (JSON, M bytes) | signature (64) | M, 64 (>II) | MAGIC

The metadata names the artifact (`name`, `version`), the key (`key_id`), and the content
(`size` = N, `sha256` of the N bytes); the Ed25519 signature covers `DOMAIN + metadata`, so
it covers the content's bytes through their sha256 (a 25 MB artifact is hashed in chunks,
never held in memory to be signed). docs/signing.md describes the format and its threat
model.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass

import msgspec

MAGIC = b"~Elkeid signature appended~\n"
TRAILER = struct.Struct(">II")
TRAILER_BYTES = TRAILER.size + len(MAGIC)
SIGNATURE_BYTES = 64  # Ed25519
#: A name and a version of at most 64 and 128 characters, a key id and a hash fit well inside.
MAX_METADATA = 4096
#: The most of a file's end a block can take: read this much to find it.
MAX_BLOCK = MAX_METADATA + SIGNATURE_BYTES + TRAILER_BYTES
#: What is signed starts with this, so a signature made for anything else never verifies.
DOMAIN = b"elkeid-artifact-signature-v1\x00"
FORMAT_VERSION = 1
KEY_ID_BYTES = 8
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(rf"[0-9a-f]{{{2 * KEY_ID_BYTES}}}")


class BadBlock(Exception):
    """The file ends with the magic but the block around it is malformed."""


class Metadata(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    format: int = FORMAT_VERSION
    key_id: str
    name: str
    version: str
    size: int
    sha256: str
    #: The agent refuses an upgrade below the running version unless this is true.
    allow_downgrade: bool = False


@dataclass(frozen=True)
class Block:
    metadata: Metadata
    metadata_bytes: bytes  # as signed
    signature: bytes

    @property
    def content_size(self) -> int:
        return self.metadata.size


def key_id(public_key: bytes) -> str:
    """A key's id: the first 8 bytes of the sha256 of its 32 raw bytes, in hex."""
    return hashlib.sha256(public_key).digest()[:KEY_ID_BYTES].hex()


def signed_message(metadata_bytes: bytes) -> bytes:
    return DOMAIN + metadata_bytes


def encode_metadata(metadata: Metadata) -> bytes:
    return msgspec.json.encode(metadata)


def encode_block(metadata_bytes: bytes, signature: bytes) -> bytes:
    if len(metadata_bytes) > MAX_METADATA or len(signature) != SIGNATURE_BYTES:
        raise ValueError("metadata too long or not an Ed25519 signature")
    return metadata_bytes + signature + TRAILER.pack(len(metadata_bytes), len(signature)) + MAGIC


def parse_tail(tail: bytes, file_size: int) -> Block | None:
    """The block at the end of a file of `file_size` bytes whose last bytes are `tail` (up to
    MAX_BLOCK of them); None when the file carries no block (unsigned)."""
    if not tail.endswith(MAGIC) or len(tail) < TRAILER_BYTES:
        return None
    meta_len, sig_len = TRAILER.unpack_from(tail, len(tail) - TRAILER_BYTES)
    if sig_len != SIGNATURE_BYTES:
        raise BadBlock(f"signature of {sig_len} bytes, not {SIGNATURE_BYTES}")
    if not 0 < meta_len <= MAX_METADATA:
        raise BadBlock(f"metadata of {meta_len} bytes (1 to {MAX_METADATA})")
    block_len = meta_len + sig_len + TRAILER_BYTES
    if block_len > len(tail) or block_len > file_size:
        raise BadBlock("the block is longer than the file")
    start = len(tail) - block_len
    metadata_bytes = tail[start : start + meta_len]
    signature = tail[start + meta_len : start + meta_len + sig_len]
    try:
        metadata = msgspec.json.decode(metadata_bytes, type=Metadata)
    except msgspec.DecodeError as exc:
        raise BadBlock(f"metadata: {exc}") from exc
    if metadata.format != FORMAT_VERSION:
        raise BadBlock(f"format {metadata.format}, not {FORMAT_VERSION}")
    if metadata.size != file_size - block_len:
        raise BadBlock(f"metadata says {metadata.size} bytes of content, "
                       f"the file holds {file_size - block_len}")
    if not _HEX64.fullmatch(metadata.sha256):
        raise BadBlock("metadata sha256 is not 64 lowercase hex digits")
    if not _KEY_ID.fullmatch(metadata.key_id):
        # Unverified text a refusal would quote into the log and state_detail.
        raise BadBlock(f"metadata key_id is not {2 * KEY_ID_BYTES} lowercase hex digits")
    return Block(metadata, metadata_bytes, signature)
