"""Streamed, verified downloads and safe tar.gz extraction (plugins now, the self-upgrade later).

Rules:
* Never the whole artifact in memory: the body streams into a temporary file in the target
  directory (same filesystem, so the final rename is atomic) while being hashed.
* Nothing unverified is ever renamed into place: a wrong sha256 deletes the temporary file and
  the next URL is tried; the caller only ever sees a verified file.
* Archives are checked member by member (`check_member`, pure) before anything is written:
  no absolute names, no `..`, no links, devices or fifos, and a cap on the unpacked size.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import stat
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from elkeid_agent import http

#: The issue's cap for a plugin or agent artifact, and for what an archive unpacks to.
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
#: A download that has not completed in this time is abandoned (the next URL is tried).
DEFAULT_TIMEOUT = 600.0
HASH_CHUNK = 1024 * 1024


class DownloadError(Exception):
    """No URL gave a verified artifact; the message lists what each URL did."""


class UnsafeArchive(Exception):
    """An archive member that would escape the directory or is not a plain file/directory."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def file_matches(path: Path, expected: str) -> bool:
    """True if `path` is a regular file hashing to `expected` (hex, any case)."""
    if not expected:
        return False
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return False
        return sha256_file(path) == expected.lower()
    except OSError:
        return False


@dataclass
class _HashingFile:
    """The download sink: writes to the temp file and feeds the hash with the same bytes."""

    fh: tempfile._TemporaryFileWrapper[bytes]
    digest: hashlib._Hash

    def __call__(self, data: bytes) -> None:
        # A blocking write of at most READ_CHUNK bytes: the page cache absorbs it in
        # microseconds, far cheaper than a thread hop per chunk.
        self.fh.write(data)
        self.digest.update(data)


async def download_verified(
    urls: Sequence[str],
    sha256: str,
    directory: Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - per URL, so the next one gets its own
    ssl_context: ssl.SSLContext | None = None,
) -> Path:
    """Fetch the first URL whose body hashes to `sha256` into a temp file in `directory`.

    Returns the temporary file's path (named `.download-*`); the caller renames or unpacks it
    and removes it. Raises DownloadError naming each URL's failure.
    """
    if not urls:
        raise DownloadError("no download URL")
    if not sha256:
        raise DownloadError("no sha256 to verify against")
    expected = sha256.lower()
    failures: list[str] = []
    for url in urls:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".download-", delete=False) as fh:
            path = Path(fh.name)
            sink = _HashingFile(fh, hashlib.sha256())
            try:
                await http.get(
                    url, sink, timeout=timeout, max_bytes=max_bytes, ssl_context=ssl_context
                )
                fh.flush()
                os.fsync(fh.fileno())
            except (http.HttpError, OSError) as exc:
                os.unlink(path)
                failures.append(f"{url}: {exc}")
                continue
            except BaseException:
                os.unlink(path)
                raise
        actual = sink.digest.hexdigest()
        if actual != expected:
            os.unlink(path)
            failures.append(f"{url}: sha256 {actual} != {expected}")
            continue
        return path
    raise DownloadError("; ".join(failures))


def check_member(name: str, kind: str, size: int) -> PurePosixPath | None:
    """Validate one archive member (pure); returns its relative path, None for the root itself.

    `kind` is "file", "dir" or anything else (link, device, fifo...), which is refused.
    """
    if kind not in ("file", "dir"):
        raise UnsafeArchive(f"{name!r}: {kind} members are not allowed")
    if size < 0:
        raise UnsafeArchive(f"{name!r}: negative size")
    if "\x00" in name:
        raise UnsafeArchive(f"{name!r}: NUL in name")
    path = PurePosixPath(name)
    if path.is_absolute():
        raise UnsafeArchive(f"{name!r}: absolute path")
    if ".." in path.parts:
        raise UnsafeArchive(f"{name!r}: parent reference")
    parts = [p for p in path.parts if p != "."]
    if not parts:
        if kind == "file":
            raise UnsafeArchive(f"{name!r}: file without a name")
        return None
    return PurePosixPath(*parts)


def _kind(member: tarfile.TarInfo) -> str:
    if member.isreg():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym() or member.islnk():
        return "link"
    if member.ischr() or member.isblk():
        return "device"
    if member.isfifo():
        return "fifo"
    return "special"


def extract_tar_gz(archive: Path, dest: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """Unpack `archive` into the empty directory `dest`, refusing anything unsafe.

    Every member is checked before the first byte is written, so a hostile archive leaves
    `dest` empty; the total unpacked size is capped. Blocking: run it in a thread.
    """
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            total = 0
            plan: list[tuple[tarfile.TarInfo, PurePosixPath]] = []
            for member in members:
                rel = check_member(member.name, _kind(member), member.size)
                total += member.size
                if total > max_bytes:
                    raise UnsafeArchive(f"unpacks to more than {max_bytes} bytes")
                if rel is not None:
                    plan.append((member, rel))
            for member, rel in plan:
                target = dest.joinpath(*rel.parts)
                if member.isdir():
                    target.mkdir(mode=0o755, parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                source = tar.extractfile(member)
                if source is None:
                    raise UnsafeArchive(f"{member.name!r}: unreadable member")
                # O_EXCL|O_NOFOLLOW: a name repeated in the archive, or anything already there,
                # is an error rather than something we write through.
                fd = os.open(
                    target,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o755 if member.mode & 0o111 else 0o644,
                )
                with source, os.fdopen(fd, "wb") as out:
                    while block := source.read(HASH_CHUNK):
                        out.write(block)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UnsafeArchive(f"cannot unpack: {exc}") from exc
