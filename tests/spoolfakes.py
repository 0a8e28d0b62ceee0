"""A fault-injecting file layer for the spool: the real `Spool` over files held in a dict.

Faults are queued (`fail_next`) and hit the next append: ENOSPC before anything is written,
EIO after half of it (truncated back, as the real layer does), a short write that leaves a
torn entry (the truncate failed too), or `hang` (the write waits until released, so a test can
cancel the writer mid-write and then let the write land or fail). A crash is a new `MemFiles`
over the same `files`: what was written survives, nothing in memory does.
"""

from __future__ import annotations

import errno
import threading
from collections import deque
from pathlib import Path

from elkeid_agent.spool import format as fmt
from elkeid_agent.spool.store import CHECKPOINT_FILE, SpoolFiles


class MemFiles(SpoolFiles):
    def __init__(self, files: dict[str, bytearray] | None = None) -> None:
        super().__init__(Path("/nonexistent/elkeid-spool"))
        self.files: dict[str, bytearray] = {} if files is None else files
        self.fds: dict[int, str] = {}
        self.next_fd = 100
        self.faults: deque[str] = deque()
        self.free = 1 << 40
        self.in_write = threading.Event()
        self.release = threading.Event()
        self.land = True  # whether a hung write lands once released, or fails

    def fail_next(self, kind: str) -> None:
        self.faults.append(kind)

    def _fd(self, name: str) -> int:
        self.next_fd += 1
        self.fds[self.next_fd] = name
        return self.next_fd

    def check_dir(self, create: bool) -> None:
        if self.faults and self.faults[0] == "nodir":
            raise OSError(errno.ENOENT, "gone")

    def listing(self) -> list[str]:
        return list(self.files)

    def is_regular(self, name: str) -> bool:
        return True

    def remove_stale(self, name: str) -> None:
        self.files.pop(name, None)

    def open_read(self, name: str) -> int:
        if name not in self.files:
            raise FileNotFoundError(errno.ENOENT, "no such file", name)
        return self._fd(name)

    def size(self, fd: int) -> int:
        return len(self.files[self.fds[fd]])

    def pread(self, fd: int, pos: int, n: int) -> bytes:
        return bytes(self.files[self.fds[fd]][pos : pos + n])

    def read_checkpoint(self) -> bytes | None:
        data = self.files.get(CHECKPOINT_FILE)
        return None if data is None else bytes(data)

    def open_segment(self, old_fd: int, seg: int) -> int:
        self.fds.pop(old_fd, None)
        name = fmt.segment_name(seg)
        if name in self.files:
            raise FileExistsError(errno.EEXIST, "exists", name)
        if self.faults and self.faults[0] == "enospc":
            self.faults.popleft()
            raise OSError(errno.ENOSPC, "no space (open)")
        self.files[name] = bytearray()
        return self._fd(name)

    def append(self, fd: int, blobs: list[bytes], start: int) -> None:
        blob = b"".join(blobs)
        data = self.files[self.fds[fd]]
        kind = self.faults.popleft() if self.faults else ""
        if kind == "enospc":
            raise OSError(errno.ENOSPC, "no space")
        if kind == "eio":
            data += blob[: len(blob) // 2]
            del data[start:]
            raise OSError(errno.EIO, "I/O error")
        if kind == "short":
            data += blob[: max(1, len(blob) // 2)]
            raise OSError(errno.ENOSPC, "short write")
        if kind == "hang":
            self.in_write.set()
            self.release.wait(10)
            if not self.land:
                raise OSError(errno.EIO, "I/O error (after the wait)")
        data += blob

    def pread_all(self, wanted: list[tuple[int, int, int]]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for seg, offset, size in wanted:
            data = self.files.get(fmt.segment_name(seg))
            out.append(None if data is None else bytes(data[offset : offset + size]))
        return out

    def unlink_segment(self, seg: int) -> None:
        self.files.pop(fmt.segment_name(seg), None)

    def cut_segment(self, seg: int, length: int) -> None:
        del self.files[fmt.segment_name(seg)][length:]

    def write_checkpoint(self, position: tuple[int, int, tuple[int, int]]) -> None:
        self.files[CHECKPOINT_FILE] = bytearray(fmt.encode_checkpoint(*position))

    def probe(self) -> None:
        if self.faults and self.faults[0] in ("enospc", "eio"):
            self.faults.popleft()
            raise OSError(errno.ENOSPC, "no space (probe)")

    def fsync(self, fd: int) -> None:
        return None

    def close(self, fd: int) -> None:
        self.fds.pop(fd, None)

    def free_bytes(self) -> int:
        return self.free
