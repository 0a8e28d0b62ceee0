"""Give back what only start-up needed, once the agent has settled.

Start-up touches far more than the steady state uses: the import machinery's garbage, the
initialisation code of grpc's 12 MiB extension and of libpython, libcrypto's tables. Once the
agent runs, three things return it to the host:

* `gc.freeze()` after a collection moves every start-up object out of the collector's
  generations, so later full collections stop walking tens of thousands of module objects;
* `malloc_trim(0)` returns the heap that start-up freed;
* `madvise(MADV_PAGEOUT)` (Linux 5.4+) on our read-only file mappings drops their resident
  pages; what the steady state really runs faults back in from the page cache, the rest
  (start-up code) stays out. Pages that other processes map are left alone by the kernel.
  Older kernels answer EINVAL and nothing changes.

Before any of that, `limit_arenas` caps glibc's malloc arenas at two, so that what the threads
free is not scattered over per-thread arenas, and fixes the size from which blocks are mapped
on their own (8 MiB messages and frames go back to the host as soon as they are freed).
`trim_heap` alone runs again after every stream that ends: a stream's buffers (grpc's and the
messages in flight) are freed then, and glibc keeps freed heap unless asked.
"""

from __future__ import annotations

import ctypes
import gc
import logging

from elkeid_agent.readcap import read_text_capped

log = logging.getLogger(__name__)

MADV_PAGEOUT = 21
#: mallopt parameters (glibc malloc.h) and the arena count the agent runs with.
M_ARENA_MAX = -8
ARENA_MAX = 2
#: /proc/self/maps: the agent has a few hundred mappings, ~100 bytes each.
MAPS_BYTES = 8 * 1024 * 1024
M_MMAP_THRESHOLD = -3
M_TRIM_THRESHOLD = -1
#: Allocations this large are mapped and unmapped on their own. glibc's default threshold
#: rises to the size of the largest block freed (up to 32 MiB), after which 8 MiB messages and
#: frames come from the heap and the heap keeps their memory: a flood or 60 frames of 8 MiB
#: kept the agent 10-25 MiB higher (bench/record_memory.py). 4 MiB leaves the messages sent
#: from memory (2 MiB at most, stream.LIVE_MESSAGE_BYTES, unless one record is larger) on the
#: heap: a mapped block's pages are faulted in at every use (an 8 MiB message: 2,048 faults).
MMAP_THRESHOLD = 4 * 1024 * 1024
#: Free heap kept at its top. Fixing MMAP_THRESHOLD also stops glibc raising this from 128 KiB:
#: every message of a steady rate was then given back and faulted in again (at 20,000
#: records/s the agent's CPU went from 2.0 % to 2.6 %; 2.32 % and 2.37 % with this).
TRIM_THRESHOLD = MMAP_THRESHOLD


def _libc() -> ctypes.CDLL | None:
    try:
        # By soname, not find_library: that runs ldconfig or gcc, in the bundle's environment.
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


def read_only_file_mappings(maps: str) -> list[tuple[int, int]]:
    """(start, length) of each mapping of a file that is not writable, from /proc/PID/maps."""
    out = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[5].startswith("/") or "w" in fields[1]:
            continue
        start, _, end = fields[0].partition("-")
        out.append((int(start, 16), int(end, 16) - int(start, 16)))
    return out


def limit_arenas() -> None:
    """At most ARENA_MAX malloc arenas, before any thread starts; blocks of MMAP_THRESHOLD
    and more mapped on their own.

    glibc gives threads arenas of their own (up to 8 per core). grpc's threads and the
    executor's each kept a little of every dead stream in theirs, beyond malloc_trim's reach:
    100 server restarts grew RSS by 2.2 MiB, with 2 arenas by 1.1 MiB (bench/churn.py).
    """
    libc = _libc()
    try:
        if libc is not None:
            libc.mallopt(M_ARENA_MAX, ARENA_MAX)
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except AttributeError:  # not glibc
        pass


def trim_heap() -> bool:
    """Give freed heap back to the OS (`malloc_trim(0)`, every arena); True if any was."""
    libc = _libc()
    try:
        return libc is not None and bool(libc.malloc_trim(0))
    except AttributeError:  # not glibc
        return False


def trim_after_start() -> None:
    """Freeze start-up objects, trim the heap and page out start-up-only file pages."""
    gc.collect()
    gc.freeze()
    libc = _libc()
    if libc is None:
        return
    try:
        libc.malloc_trim(0)
        mappings = read_only_file_mappings(
            read_text_capped("/proc/self/maps", MAPS_BYTES, errors="replace")
        )
    except (OSError, AttributeError) as exc:
        log.debug("memory trim skipped: %s", exc)
        return
    madvise = libc.madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    advised = sum(1 for start, length in mappings if madvise(start, length, MADV_PAGEOUT) == 0)
    log.debug("memory trimmed: %d of %d file mappings paged out", advised, len(mappings))
