"""Checking a downloaded artifact's appended signature against the pinned keys, and cutting
the block off before the artifact is used (files: the tail is read, the content hashed).

`Verifier.check` runs in a worker thread (hashing an agent package takes a while); the
caller applies the verdict: in `enforce` a problem refuses the artifact before anything of
it runs or is swapped in; in `warn` it is logged and counted; in `off` nothing is checked,
but a block that parses is still cut off where the artifact needs that (a tar.gz, a
package), so a signed artifact works under every policy.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from elkeid_agent.config import SigningConfig
from elkeid_agent.signing.format import MAX_BLOCK, BadBlock, Block, parse_tail
from elkeid_agent.signing.keys import PinnedKey, Policy, decode_public_key, is_downgrade, problem

HASH_CHUNK = 1024 * 1024
#: Heartbeat counters: artifacts refused in enforce, and used despite a problem in warn.
REFUSED_COUNTER = "signature_refused"
WARNED_COUNTER = "signature_warnings"
#: Beside the files unpacked from an archive whose signature held (plugins/install.py): what
#: was verified, since the unpacked executable carries no block to check at the next sync.
UNPACKED_RECORD = ".signature.json"


class UnpackedRecord(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    name: str
    version: str
    key_id: str
    executable_sha256: str


@dataclass(frozen=True)
class Verdict:
    problem: str | None  # None: verified (or not checked, policy off)
    refuse: bool  # enforce, and a problem
    block: Block | None  # the block found at the end, if one parsed


class Verifier:
    def __init__(self, policy: Policy = Policy.OFF, keys: Sequence[PinnedKey] = ()) -> None:
        self.policy = policy
        self.keys = tuple(keys)

    def check(self, path: Path, name: str, version: str,
              running_version: str | None = None) -> Verdict:
        """The verdict on the file at `path` as `name` `version`. With `running_version`
        (the agent's own upgrade), a lower version is a problem unless the signed metadata
        allows the downgrade."""
        try:
            block = read_block(path)
        except BadBlock as exc:
            return self._verdict(f"malformed signature block: {exc}", None)
        if self.policy is Policy.OFF:
            return Verdict(None, False, block)
        size = block.content_size if block is not None else path.stat().st_size
        digest = sha256_prefix(path, size)
        found = problem(block, digest, self.keys, name, version, datetime.now(UTC))
        if (found is None and block is not None and running_version is not None
                and is_downgrade(version, running_version)
                and not block.metadata.allow_downgrade):
            found = (f"downgrade from {running_version} to {version} "
                     "not allowed by the signed metadata")
        return self._verdict(found, block)

    def unpacked_problem(self, record: bytes | None, name: str, version: str,
                         executable_sha256: str) -> str | None:
        """Why files in place, unpacked from an archive, are not known to be what a pinned
        key signed as `name` `version` (`record`: the UNPACKED_RECORD beside them, None when
        there is none); None if they are, or under policy off."""
        if self.policy is Policy.OFF:
            return None
        if record is None:
            return "the files in place were not unpacked from a verified archive"
        try:
            rec = msgspec.json.decode(record, type=UnpackedRecord)
        except msgspec.DecodeError:
            return f"{UNPACKED_RECORD} does not parse"
        if rec.name != name or rec.version != version:
            return (f"the files in place were verified as {rec.name!r} {rec.version!r}, "
                    f"not {name!r} {version!r}")
        if rec.executable_sha256 != executable_sha256.lower():
            return "the executable in place is not the one verified"
        key = next((k for k in self.keys if k.key_id == rec.key_id), None)
        if key is None:
            return f"verified with key {rec.key_id}, no longer pinned"
        if key.not_after is not None and datetime.now(UTC) > key.not_after:
            return f"verified with key {rec.key_id}, expired {key.not_after.isoformat()}"
        return None

    def _verdict(self, found: str | None, block: Block | None) -> Verdict:
        if self.policy is Policy.OFF:
            return Verdict(None, False, None)
        return Verdict(found, found is not None and self.policy is Policy.ENFORCE, block)


def unpacked_record(verdict: Verdict, name: str, version: str, executable: Path) -> bytes | None:
    """The UNPACKED_RECORD for `executable`, unpacked from an archive with this verdict; None
    unless its signature held (unsigned, a problem used anyway in warn, or policy off)."""
    if verdict.problem is not None or verdict.block is None:
        return None
    digest = sha256_prefix(executable, executable.stat().st_size)
    return msgspec.json.encode(UnpackedRecord(
        name=name, version=version, key_id=verdict.block.metadata.key_id,
        executable_sha256=digest))


def verifier_from(config: SigningConfig) -> Verifier:
    """The verifier of the config's `[signing]` (keys validated when the config loaded)."""
    keys = [PinnedKey(decode_public_key(k.public_key), k.not_after) for k in config.keys]
    return Verifier(Policy(config.policy or Policy.OFF), keys)


def read_block(path: Path) -> Block | None:
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        fh.seek(max(0, size - MAX_BLOCK))
        tail = fh.read(MAX_BLOCK)
    return parse_tail(tail, size)


def sha256_prefix(path: Path, size: int) -> str:
    """The sha256 of the first `size` bytes of the file."""
    digest = hashlib.sha256()
    left = size
    with path.open("rb") as fh:
        while left > 0:
            block = fh.read(min(HASH_CHUNK, left))
            if not block:
                break
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def strip(path: Path, verdict: Verdict) -> None:
    """Cut the signature block off the file (a tar.gz or package must end where it ends)."""
    if verdict.block is not None:
        os.truncate(path, verdict.block.content_size)
