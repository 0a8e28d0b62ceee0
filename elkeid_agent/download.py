"""Streamed, verified downloads and safe tar.gz extraction (plugins and the self-upgrade).

Rules:
* Never the whole artifact in memory: the body streams into a temporary file in the target
  directory (same filesystem, so the final rename is atomic) and into the hash as it arrives,
  a block at a time; writing, hashing, fsync and unlink run in worker threads, so the event
  loop (and every plugin pipe it serves) never waits on the disk.
* Nothing unverified is ever renamed into place: a wrong sha256 deletes the temporary file and
  the next URL is tried; the caller only ever sees a verified file.
* A URL that makes less than the minimum progress (`progress.Rule`: 64 KiB in 60 s by default)
  is abandoned and the next one tried; no URL runs past the entry's deadline.
* A local write failure (a full disk) ends the download at once, other URLs would fill the same
  disk; the partial file is removed and the reason names the OSError.
* Archives are checked member by member (`check_member`, pure) in a first streaming pass before
  anything is written: no absolute names, no `..`, no links, devices or fifos, at most
  MAX_ARCHIVE_MEMBERS members, a cap on the unpacked size, and `tarstream`'s caps on names,
  pax headers and nesting depth. A breach of a cap carries the name of its heartbeat counter
  (`UnsafeArchive.counter`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import os
import ssl
import stat
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from elkeid_agent import http
from elkeid_agent.progress import Progress, Watch
from elkeid_agent.redact import redact
from elkeid_agent.tarstream import Member, TarReader, TarRefused, quote_name

#: The issue's cap for a plugin or agent artifact, and for what an archive unpacks to.
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
#: A download that has not completed in this time is abandoned (the next URL is tried).
DEFAULT_TIMEOUT = 600.0
HASH_CHUNK = 1024 * 1024
#: Bytes gathered from the network before one write (and hash update) in a worker thread.
WRITE_BLOCK = 1024 * 1024
#: Members of a plugin archive: a plugin ships an executable and a few files, not a tree.
MAX_ARCHIVE_MEMBERS = 10_000
#: Heartbeat counters of the archive caps' breaches.
MEMBER_CAP_COUNTER = "archive_member_cap"
SIZE_CAP_COUNTER = "archive_size_cap"


class DownloadError(Exception):
    """No URL gave a verified artifact; the message lists what each URL did."""


class WriteFailed(DownloadError):
    """The download could not be written to the local disk; the message names the OSError."""


class UnsafeArchive(Exception):
    """An archive member that would escape the directory or is not a plain file/directory,
    or an archive over a cap (then `counter` names the heartbeat counter of that cap)."""

    def __init__(self, reason: str, counter: str | None = None) -> None:
        super().__init__(reason)
        self.counter = counter


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


class _HashingFile:
    """The download sink: the temporary file and the hash get the same bytes, a block at a
    time in a worker thread (at most WRITE_BLOCK plus one read are ever held in memory)."""

    def __init__(self, directory: Path) -> None:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".download-")
        self.path = Path(name)
        self.fh: BinaryIO = os.fdopen(fd, "wb")
        self.digest = hashlib.sha256()
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    async def __call__(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= WRITE_BLOCK:
            await self._flush()

    async def _flush(self) -> None:
        block = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        await asyncio.to_thread(self._write, block)

    def _write(self, block: bytes) -> None:
        # hashlib releases the GIL on large blocks: the loop thread keeps running meanwhile.
        self.digest.update(block)
        self.fh.write(block)

    async def finish(self) -> str:
        """Write what is pending, make it durable; the hex sha256 of everything received."""
        await self._flush()
        await asyncio.to_thread(self._sync)
        return self.digest.hexdigest()

    def _sync(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()

    def discard(self) -> None:
        """Close and remove the file (blocking: a large unlink takes a while)."""
        with contextlib.suppress(OSError):
            self.fh.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


async def download_verified(
    urls: Sequence[str],
    sha256: str,
    directory: Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - per URL, so the next one gets its own
    ssl_context: ssl.SSLContext | None = None,
    progress: Progress | None = None,
) -> Path:
    """Fetch the first URL whose body hashes to `sha256` into a temp file in `directory`.

    Returns the temporary file's path (named `.download-*`); the caller renames or unpacks it
    and removes it. Raises DownloadError naming each URL's failure (WriteFailed, at once, when
    the local disk refuses the bytes). `progress` (the caller's) holds the time budget: a URL
    under its minimum progress is abandoned (noted in `progress.abandoned`) and the next one
    tried; no URL is started after the entry's deadline, and none runs past it.
    """
    if not urls:
        raise DownloadError("no download URL")
    if not sha256:
        raise DownloadError("no sha256 to verify against")
    progress = progress if progress is not None else Progress()
    rule = progress.rule
    loop = asyncio.get_running_loop()
    deadline = loop.time() + rule.deadline
    expected = sha256.lower()
    failures: list[str] = []
    for url in urls:
        shown = redact(url)
        left = deadline - loop.time()
        if left <= 0:
            failures.append(f"{shown}: not tried, the entry's deadline of {rule.deadline:g} s "
                            "has passed")
            continue
        try:
            sink = await asyncio.to_thread(_HashingFile, directory)
        except OSError as exc:
            raise WriteFailed(f"cannot create a file in {directory}: {exc}") from exc
        watch = progress.watch = Watch(url, rule, time.monotonic())
        try:
            done = await _fetch(url, sink, watch, timeout=min(timeout, left),
                                max_bytes=max_bytes, ssl_context=ssl_context)
            actual = await sink.finish() if done else None
        except http.HttpError as exc:
            await asyncio.to_thread(sink.discard)
            failures.append(f"{shown}: {exc}")
            continue
        except OSError as exc:
            await asyncio.to_thread(sink.discard)
            raise WriteFailed(f"{shown}: cannot write {sink.path}: {exc}") from exc
        except BaseException:
            # Cancelled (or a bug): no await here, the file must go all the same.
            sink.discard()
            raise
        finally:
            progress.watch = None
        if actual is None:
            await asyncio.to_thread(sink.discard)
            reason = f"{shown}: {watch.shortfall(time.monotonic())}"
            progress.abandon(reason)
            failures.append(reason)
            continue
        if actual != expected:
            await asyncio.to_thread(sink.discard)
            failures.append(f"{shown}: sha256 {actual} != {expected}")
            continue
        return sink.path
    raise DownloadError("; ".join(failures))


async def _fetch(
    url: str,
    sink: _HashingFile,
    watch: Watch,
    *,
    timeout: float,  # noqa: ASYNC109 - the URL's share of the entry's deadline, for http.get
    max_bytes: int,
    ssl_context: ssl.SSLContext | None,
) -> bool:
    """Stream `url` into `sink`; False when it fell under the minimum progress (abandoned).

    The minimum is a timeout scope moved on each time a window's bytes are in: no timer per
    read, and a host that sends nothing at all is caught as surely as one that drips.
    """
    loop = asyncio.get_running_loop()

    def on_loop(when: float) -> float:
        # The watch keeps time.monotonic(), which a heartbeat can read outside the loop.
        return loop.time() + when - time.monotonic()

    scope = asyncio.timeout_at(on_loop(watch.due))

    async def counted(data: bytes) -> None:
        if watch.feed(len(data), time.monotonic()) and not scope.expired():
            scope.reschedule(on_loop(watch.due))
        await sink(data)

    try:
        async with scope:
            await http.get(url, counted, timeout=timeout, max_bytes=max_bytes,
                           ssl_context=ssl_context)
    except TimeoutError:
        if scope.expired():
            return False
        raise
    return True


def check_member(name: str, kind: str, size: int) -> PurePosixPath | None:
    """Validate one archive member (pure); returns its relative path, None for the root itself.

    `kind` is "file", "dir" or anything else (a link, device, fifo...), which is refused.
    """
    if kind not in ("file", "dir"):
        raise UnsafeArchive(f"{quote_name(name)}: {kind} members are not allowed")
    if size < 0:
        raise UnsafeArchive(f"{quote_name(name)}: negative size")
    if "\x00" in name:
        raise UnsafeArchive(f"{quote_name(name)}: NUL in name")
    path = PurePosixPath(name)
    if path.is_absolute():
        raise UnsafeArchive(f"{quote_name(name)}: absolute path")
    if ".." in path.parts:
        raise UnsafeArchive(f"{quote_name(name)}: parent reference")
    parts = [p for p in path.parts if p != "."]
    if not parts:
        if kind == "file":
            raise UnsafeArchive(f"{quote_name(name)}: file without a name")
        return None
    return PurePosixPath(*parts)


def _checked_members(
    reader: TarReader, max_bytes: int
) -> Iterator[tuple[Member, PurePosixPath]]:
    """The archive's members in order, each checked; the caps end the walk at their breach."""
    total = 0
    for member in reader:
        rel = check_member(member.name, member.kind, member.size)
        total += member.size
        if total > max_bytes:
            raise UnsafeArchive(f"unpacks to more than {max_bytes} bytes", SIZE_CAP_COUNTER)
        if rel is not None:
            yield member, rel


def extract_tar_gz(
    archive: Path,
    dest: Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_members: int = MAX_ARCHIVE_MEMBERS,
) -> None:
    """Unpack `archive` into the empty directory `dest`, refusing anything unsafe.

    A first pass checks every member before the first byte is written, so a hostile archive
    leaves `dest` empty; a second one writes. Both stream (no seeking, so no re-decompression
    from the start per member) through `tarstream`, which checks each header's declared size
    before reading it, and stop at a cap: memory stays at a chunk, time within the caps.
    Blocking: run it in a thread.
    """
    try:
        with gzip.open(archive, "rb") as gz:
            reader = TarReader(gz, max_members=max_members, member_counter=MEMBER_CAP_COUNTER)
            for _ in _checked_members(reader, max_bytes):
                pass
        with gzip.open(archive, "rb") as gz:
            reader = TarReader(gz, max_members=max_members, member_counter=MEMBER_CAP_COUNTER)
            for member, rel in _checked_members(reader, max_bytes):
                _write_member(reader, member, dest.joinpath(*rel.parts))
    except TarRefused as exc:
        raise UnsafeArchive(str(exc), exc.counter) from exc
    except (EOFError, zlib.error, OSError) as exc:
        # gzip.BadGzipFile is an OSError.
        raise UnsafeArchive(f"cannot unpack: {exc}") from exc


def _write_member(reader: TarReader, member: Member, target: Path) -> None:
    if member.kind == "dir":
        _make_dirs(target)
        return
    _make_dirs(target.parent)
    # O_EXCL|O_NOFOLLOW: a name repeated in the archive, or anything already there, is an
    # error rather than something we write through.
    fd = os.open(
        target,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o755 if member.mode & 0o111 else 0o644,
    )
    with os.fdopen(fd, "wb") as out:
        for block in reader.body():
            out.write(block)


def _make_dirs(directory: Path) -> None:
    """`mkdir -p` without recursion (Path.mkdir(parents=True) recurses once per level)."""
    missing: list[Path] = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir(mode=0o755, exist_ok=True)
