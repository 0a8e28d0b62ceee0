"""A download host that misbehaves on purpose: a threaded socket server on 127.0.0.1.

Each path is scripted with a `Behaviour`, a function that gets the accepted (maybe TLS)
socket and writes whatever it likes. Every request head is kept (raw bytes), so a test can
say what the agent asked for, and `release()` ends every behaviour still holding a
connection open (a stall ends when the case does, so the agent's download ends with it).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

Behaviour = Callable[[socket.socket, "Hostile"], None]
HEAD_LIMIT = 64 * 1024
BLOCK = 1024 * 1024


@dataclass
class Progress:
    """What one streaming behaviour has sent so far; `done` once it stopped, either way."""

    sent: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    broken: bool = False  # the client went away before the end


class Hostile:
    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Behaviour] = {}
        self.heads: list[bytes] = []
        self.ssl_context = ssl_context
        self.released = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, name="hostile", daemon=True)
        self._acceptor.start()

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def paths(self) -> list[bytes]:
        """The request target of every request so far (raw bytes)."""
        with self._lock:
            return [h.split(b" ", 2)[1] if h.count(b" ") >= 2 else h for h in self.heads]

    def release(self) -> None:
        """End every connection a behaviour still holds (stalls, endless streams)."""
        self.released.set()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        for thread in list(self._threads):
            thread.join(5)
        self.released.clear()

    def close(self) -> None:
        self.release()
        # close() alone does not wake a thread blocked in accept(); shutdown() does.
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._acceptor.join(5)

    def __enter__(self) -> Hostile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
            thread.start()

    def _serve(self, raw: socket.socket) -> None:
        conn: socket.socket = raw
        try:
            if self.ssl_context is not None:
                conn = self.ssl_context.wrap_socket(raw, server_side=True)
            with self._lock:
                self._conns.append(conn)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < HEAD_LIMIT:
                data = conn.recv(4096)
                if not data:
                    return
                head += data
            with self._lock:
                self.heads.append(head)
            target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
            behaviour = self.routes.get(target.decode("latin-1"), not_found)
            behaviour(conn, self)
        except (OSError, ssl.SSLError):
            pass  # the agent hung up: what these behaviours expect sooner or later
        finally:
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)
            conn.close()


def not_found(conn: socket.socket, server: Hostile) -> None:
    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def raw(data: bytes) -> Behaviour:
    """Send `data` and close."""

    def behave(conn: socket.socket, server: Hostile) -> None:
        conn.sendall(data)

    return behave


def body(data: bytes) -> Behaviour:
    """A well-formed 200 with Content-Length."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(data)
    return raw(head + data)


def redirect(location: str) -> Behaviour:
    return raw(
        b"HTTP/1.1 302 Found\r\nLocation: %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        % location.encode()
    )


def stall(head: bytes, sent: Progress | None = None) -> Behaviour:
    """Send `head` (headers and part of a body), then hold the connection until released."""

    def behave(conn: socket.socket, server: Hostile) -> None:
        conn.sendall(head)
        if sent is not None:
            sent.sent = len(head)
        server.released.wait()

    return behave


def endless_headers(progress: Progress) -> Behaviour:
    """A status line, then header lines for as long as the client reads them."""

    def behave(conn: socket.socket, server: Hostile) -> None:
        line = b"X-Filler: " + b"a" * 100 + b"\r\n"
        block = b"HTTP/1.1 200 OK\r\n" + line * 1000
        try:
            while not server.released.is_set():
                conn.sendall(block)
                progress.sent += len(block)
                block = line * 1000
        except OSError:
            progress.broken = True
        finally:
            progress.done.set()

    return behave


def stream(
    total: int, progress: Progress, head: bytes, gate: threading.Event | None = None
) -> Behaviour:
    """`head`, then `total` bytes of body in 1 MiB blocks, then close. With a `gate`, the
    first block is sent, then the rest waits until the gate opens."""

    def behave(conn: socket.socket, server: Hostile) -> None:
        block = b"\xa5" * BLOCK
        try:
            conn.sendall(head)
            while progress.sent < total and not server.released.is_set():
                n = min(BLOCK, total - progress.sent)
                conn.sendall(block[:n])
                progress.sent += n
                if gate is not None:
                    gate.wait()
        except OSError:
            progress.broken = True
        finally:
            progress.done.set()

    return behave
