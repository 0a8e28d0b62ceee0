"""Putting a plugin's files in place: check what is on disk, download, verify, unpack, swap.

`prepare` does all the slow and fallible work while the old version (if any) still runs and
leaves the result in hidden names inside the plugin directory (`.download-*`, `.staging-*`);
`commit` then moves it into place with renames, after the old process has stopped. So a
failed download, a bad checksum or a hostile archive leaves the running plugin untouched, and
the executable name only ever points at verified bytes.

The appended signature (docs/signing.md) is checked right after the download, before
anything unpacks or runs: refused in `enforce`, logged in `warn`. A bare executable keeps
its block (an ELF file runs with bytes after its end, and its sha256 stays the one the
server names); a tar.gz loses it before it is unpacked, and its verification is recorded
beside the unpacked files (`.signature.json`), which have no block of their own to check at
the next sync.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from elkeid_agent.commands import NAME_RE, ConfigSpec
from elkeid_agent.download import (
    DEFAULT_TIMEOUT,
    download_verified,
    extract_tar_gz,
    file_matches,
    sha256_file,
)
from elkeid_agent.fsutil import atomic_write, remove_tree
from elkeid_agent.progress import Progress
from elkeid_agent.readcap import SMALL_FILE_BYTES, read_capped
from elkeid_agent.signing.check import (
    UNPACKED_RECORD,
    Verdict,
    Verifier,
    strip,
    unpacked_record,
)
from elkeid_agent.signing.keys import Policy

log = logging.getLogger(__name__)

TAR_GZ = "tar.gz"


class InstallError(Exception):
    """The plugin's files could not be put in place; the message says why."""


class SignatureRefused(InstallError):
    """The signing policy is enforce and the artifact's signature does not hold."""


@dataclass
class Staged:
    """A verified artifact waiting for `commit`: a file, or an unpacked tree."""

    directory: Path
    download: Path
    unpacked: Path | None
    #: The signature's problem, used anyway (policy warn).
    signature_warning: str | None = None


def valid_name(name: str) -> bool:
    # fullmatch: `$` would let a trailing newline through.
    return NAME_RE.fullmatch(name) is not None


async def prepare(
    directory: Path,
    spec: ConfigSpec,
    *,
    max_bytes: int,
    ssl_context: ssl.SSLContext | None,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - per URL, see download_verified
    verifier: Verifier | None = None,
    progress: Progress | None = None,
) -> Staged | None:
    """Stage the plugin's files; None when the executable on disk is already the right one."""
    executable = directory / spec.name
    expected = spec.signature or spec.sha256
    verifier = verifier or Verifier()
    if await asyncio.to_thread(file_matches, executable, expected):
        if spec.type != TAR_GZ:
            # The same bytes, now asked for as this name and version: the block they kept
            # must say so too.
            _apply(await asyncio.to_thread(verifier.check, executable, spec.name,
                                           spec.version), spec)
            return None
        # An unpacked archive's executable has no block to ask: the record written when its
        # archive was verified speaks for it. Without one (a bare plugin installed unsigned
        # under warn, now called an archive's executable; files the Go agent unpacked),
        # enforce fetches and checks the archive again rather than run them.
        found = await asyncio.to_thread(_unpacked_problem, verifier, directory, spec, expected)
        if found is None or verifier.policy is not Policy.ENFORCE:
            _apply(Verdict(found, False, None), spec)
            return None
        log.warning("plugin %s %s: %s; its archive is downloaded and checked", spec.name,
                    spec.version, found)
    if not spec.download_urls:
        raise InstallError("executable missing or different, and no download URL")
    download = await download_verified(
        spec.download_urls,
        spec.sha256,
        directory,
        max_bytes=max_bytes,
        timeout=timeout,
        ssl_context=ssl_context,
        progress=progress,
    )
    staged = Staged(directory, download, None)
    try:
        verdict = await asyncio.to_thread(verifier.check, download, spec.name, spec.version)
        staged.signature_warning = _apply(verdict, spec)
        candidate = download
        if spec.type == TAR_GZ:
            staged.unpacked = Path(tempfile.mkdtemp(prefix=".staging-", dir=directory))
            candidate = staged.unpacked / spec.name
            await asyncio.to_thread(strip, download, verdict)
            await asyncio.to_thread(extract_tar_gz, download, staged.unpacked,
                                    max_bytes=max_bytes)
            if not candidate.is_file():
                raise InstallError(f"the archive has no executable {spec.name!r} at its top level")
        await asyncio.to_thread(check_signature, candidate, spec.signature)
        if staged.unpacked is not None:
            await asyncio.to_thread(_record_unpacked, staged.unpacked, verdict, spec, candidate)
    except BaseException:
        discard(staged)
        raise
    return staged


def _unpacked_problem(verifier: Verifier, directory: Path, spec: ConfigSpec,
                      executable_sha256: str) -> str | None:
    try:
        record: bytes | None = read_capped(directory / UNPACKED_RECORD, SMALL_FILE_BYTES)
    except OSError:
        record = None
    return verifier.unpacked_problem(record, spec.name, spec.version, executable_sha256)


def _record_unpacked(unpacked: Path, verdict: Verdict, spec: ConfigSpec,
                     executable: Path) -> None:
    """Our record of the archive's verification beside its files, never the archive's own (an
    unsigned one used under warn could carry a record claiming anything)."""
    path = unpacked / UNPACKED_RECORD
    if path.is_dir() and not path.is_symlink():
        remove_tree(path)
    else:
        path.unlink(missing_ok=True)
    record = unpacked_record(verdict, spec.name, spec.version, executable)
    if record is not None:
        atomic_write(path, record, 0o644, durable=False)


def _apply(verdict: Verdict, spec: ConfigSpec) -> str | None:
    """Raise SignatureRefused for a refusal; the problem used anyway (warn), or None."""
    if verdict.refuse:
        raise SignatureRefused(f"signature: {verdict.problem}; refused (signing policy enforce)")
    if verdict.problem is not None:
        log.warning("plugin %s %s: signature: %s; used anyway (signing policy warn)",
                    spec.name, spec.version, verdict.problem)
    return verdict.problem


def check_signature(executable: Path, signature: str) -> None:
    """The executable must hash to the Config's `signature` before it ever runs.

    `signature` is the sha256 of the executable itself (PROTOCOL.md), which for a tar.gz is not
    the archive's `sha256`; an empty one says nothing beyond `sha256`, already verified.
    """
    if not signature:
        return
    actual = sha256_file(executable)
    if actual != signature.lower():
        raise InstallError(
            f"the executable {executable.name!r} hashes to {actual}, not the signature {signature}"
        )


def commit(staged: Staged, name: str) -> None:
    """Move the staged files into the plugin directory (the plugin must not be running)."""
    # The record of the files being replaced; an archive's own comes with them.
    (staged.directory / UNPACKED_RECORD).unlink(missing_ok=True)
    if staged.unpacked is None:
        os.chmod(staged.download, 0o755)
        os.replace(staged.download, staged.directory / name)
        return
    for entry in sorted(staged.unpacked.iterdir()):
        target = staged.directory / entry.name
        # A directory cannot be renamed over a non-empty one: the archive's version wins.
        if target.is_dir() and not target.is_symlink():
            remove_tree(target)
        elif entry.is_dir() and (target.exists() or target.is_symlink()):
            target.unlink()
        os.replace(entry, target)
    discard(staged)


def discard(staged: Staged) -> None:
    staged.download.unlink(missing_ok=True)
    if staged.unpacked is not None:
        remove_tree(staged.unpacked, ignore_errors=True)


def clean_leftovers(directory: Path) -> None:
    """Remove staging files a previous agent left when it died mid-install."""
    for entry in directory.glob(".download-*"):
        entry.unlink(missing_ok=True)
    for entry in directory.glob(".staging-*"):
        remove_tree(entry, ignore_errors=True)
