"""Why a dial to the AgentCenter fails, in one line: the standard library repeats it step by step.

gRPC reports every failed dial as UNAVAILABLE or a timeout and writes the cause only to its own
stderr. This probe resolves the name, connects, does the TLS handshake with the agent's own
material and name pin (ALPN h2, as gRPC offers it), then sends one HTTP/2 PING, and names the
first step that failed: the name does not resolve, the port refuses, nothing answers, the
server's certificate is for another name or from another CA or expired, the server refused our
certificate, the server closed the connection, or ok with the PING's round-trip time.

`probe()` blocks (the agent runs it in a thread); the classification of what went wrong is
pure (`tls_reason`, `read_frames`) and tested without sockets.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from dataclasses import dataclass
from enum import StrEnum

from elkeid_agent.transport.certinfo import verify_client_cert
from elkeid_agent.transport.tls import TlsMaterial


class Step(StrEnum):
    OK = "ok"
    ADDRESS = "address"
    DNS = "dns"
    REFUSED = "refused"
    TIMEOUT = "timeout"
    NETWORK = "network"
    TLS = "tls"
    CLOSED = "closed"


@dataclass(frozen=True)
class ProbeResult:
    step: Step
    reason: str  # one line for the log, state_detail and `doctor`
    peer: str = ""  # the ip:port that answered, when one did
    rtt: float = 0.0  # seconds, HTTP/2 PING to its ACK, when ok

    @property
    def ok(self) -> bool:
        return self.step is Step.OK


# OpenSSL X509_V_ERR_* codes the operator needs told apart.
_CERT_EXPIRED = 10
_CERT_NOT_YET_VALID = 9
_HOSTNAME_MISMATCH = 62
_UNKNOWN_ISSUER = frozenset({2, 18, 19, 20, 21})

# TLS alerts the server sends when it refuses our certificate (OpenSSL reason names).
_ALERTS = {
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the server refused our client certificate: expired",
    "TLSV1_ALERT_UNKNOWN_CA": "the server refused our client certificate: unknown CA "
    "(it does not trust the CA that signed tls.cert)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server refused our client certificate: bad certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the server refused our client certificate: "
    "unsupported certificate (usage not clientAuth?)",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "the server refused our client certificate: revoked",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate",
    "TLSV1_ALERT_NO_APPLICATION_PROTOCOL": "the server does not speak HTTP/2 (ALPN h2)",
    "WRONG_VERSION_NUMBER": "not a TLS server (it answered in plain text)",
}

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: SETTINGS_MAX_FRAME_SIZE's default, which the probe never raises: a server may not send a
#: longer frame, so no more than this is ever buffered for one.
H2_MAX_FRAME = 16384
_SETTINGS, _PING, _GOAWAY = 0x4, 0x6, 0x7
_ACK = 0x1
_PING_DATA = b"elkeidok"


def split_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` → (host, port); ValueError names what is wrong."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port")
    return host.removeprefix("[").removesuffix("]"), int(port)


def client_context(tls: TlsMaterial) -> ssl.SSLContext:
    """The agent's side of the handshake: our CA only, our client cert, the name pin, h2."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=tls.ca.decode("ascii"))
    context.load_cert_chain(tls.cert_path, tls.key_path)
    context.set_alpn_protocols(["h2"])
    return context


def tls_reason(exc: ssl.SSLError, server_name: str) -> str:
    """One line for a failed TLS handshake or a TLS alert read after it."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code, message = exc.verify_code, exc.verify_message
        if code == _HOSTNAME_MISMATCH:
            return f"TLS: the server's certificate is not for {server_name} ({message})"
        if code == _CERT_EXPIRED:
            return "TLS: the server's certificate has expired"
        if code == _CERT_NOT_YET_VALID:
            return "TLS: the server's certificate is not valid yet (check the clock)"
        if code in _UNKNOWN_ISSUER:
            return f"TLS: the server's certificate is from an unknown CA, not tls.ca ({message})"
        return f"TLS: the server's certificate was rejected: {message}"
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "the server closed the connection during the TLS handshake"
    reason = exc.reason or ""
    if reason in _ALERTS:
        return f"TLS: {_ALERTS[reason]}"
    return f"TLS handshake failed: {reason or exc}"


@dataclass(frozen=True)
class H2Frame:
    type: int
    flags: int
    payload: bytes


def read_frames(buffer: bytearray) -> list[H2Frame]:
    """Take the complete HTTP/2 frames off the front of `buffer`."""
    frames = []
    while len(buffer) >= 9:
        length = int.from_bytes(buffer[:3], "big")
        if len(buffer) < 9 + length:
            break
        frames.append(H2Frame(buffer[3], buffer[4], bytes(buffer[9 : 9 + length])))
        del buffer[: 9 + length]
    return frames


def _frame(kind: int, flags: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + b"\0\0\0\0" + payload


def _remaining(deadline: float) -> float:
    """Seconds left until `deadline`; TimeoutError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _h2_ping(conn: ssl.SSLSocket, tls: TlsMaterial, deadline: float) -> ProbeResult | float:
    """The round-trip time of one PING, or why the server would not answer it by `deadline`
    (a server that keeps sending other frames is not waited for past it)."""
    server_name = tls.server_name
    conn.sendall(H2_PREFACE + _frame(_SETTINGS, 0) + _frame(_PING, 0, _PING_DATA))
    sent = time.monotonic()
    buffer = bytearray()
    seen = False
    while True:
        conn.settimeout(_remaining(deadline))
        try:
            chunk = conn.recv(65536)
        except ssl.SSLError as exc:
            # TLS 1.3: the server checks our certificate after our side has finished.
            return ProbeResult(Step.TLS, tls_reason(exc, server_name))
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            if buffer or seen:
                return ProbeResult(Step.CLOSED, "the server closed the connection")
            return ProbeResult(Step.TLS, _refused_after_handshake(tls))
        buffer += chunk
        if len(buffer) >= 3 and int.from_bytes(buffer[:3], "big") > H2_MAX_FRAME:
            size = int.from_bytes(buffer[:3], "big")
            return ProbeResult(
                Step.CLOSED, f"the server sent an HTTP/2 frame of {size} bytes (at most "
                f"{H2_MAX_FRAME}): it is not an HTTP/2 server"
            )
        for frame in read_frames(buffer):
            seen = True
            if frame.type == _PING and frame.flags & _ACK:
                return time.monotonic() - sent
            if frame.type == _SETTINGS and not frame.flags & _ACK:
                conn.sendall(_frame(_SETTINGS, _ACK))
            if frame.type == _GOAWAY:
                code = struct.unpack(">I", frame.payload[4:8])[0] if len(frame.payload) >= 8 else 0
                return ProbeResult(Step.CLOSED, f"the server sent GOAWAY (HTTP/2 error {code})")


def _refused_after_handshake(tls: TlsMaterial) -> str:
    # A gRPC server that refuses the client's certificate just closes the connection (no
    # alert), which under TLS 1.3 happens after our side finished: say what is wrong with ours.
    why = verify_client_cert(tls.ca, tls.cert_path, tls.key_path)
    if why:
        return f"TLS: the server refused our client certificate (tls.cert: {why})"
    return (
        "TLS: the server closed the connection after the handshake: it does not trust our "
        "client certificate (tls.cert), or it is not an AgentCenter"
    )


def probe(address: str, tls: TlsMaterial, timeout: float) -> ProbeResult:
    """Dial `address` as the agent would and say what happened (blocking, 2 x timeout at most)."""
    try:
        host, port = split_address(address)
    except ValueError as exc:
        return ProbeResult(Step.ADDRESS, str(exc))
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return ProbeResult(Step.DNS, f"cannot resolve {host}: {exc.strerror}")
    except ValueError as exc:  # UnicodeError: a label the idna codec refuses; a NUL
        return ProbeResult(Step.DNS, f"cannot resolve {host!r}: {exc}")
    # Every step has `timeout`; the whole dial after the name lookup at most twice that, so
    # neither many addresses nor a peer that keeps talking hold the probe (and its thread).
    deadline = time.monotonic() + 2 * timeout
    failures: list[ProbeResult] = []
    for family, kind, proto, _, sockaddr in infos:
        peer = f"[{sockaddr[0]}]:{port}" if family == socket.AF_INET6 else f"{sockaddr[0]}:{port}"
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            sock = socket.socket(family, kind, proto)
        except OSError as exc:  # out of fds, a family the kernel lacks
            failures.append(ProbeResult(Step.NETWORK, f"{peer}: {exc.strerror or exc}", peer))
            continue
        sock.settimeout(min(timeout, left))
        try:
            sock.connect(sockaddr)
        except ConnectionRefusedError:
            failures.append(ProbeResult(Step.REFUSED, f"connection refused by {peer}", peer))
            sock.close()
            continue
        except TimeoutError:
            failures.append(
                ProbeResult(Step.TIMEOUT, f"no answer from {peer} within {timeout:g} s", peer)
            )
            sock.close()
            continue
        except OSError as exc:
            failures.append(ProbeResult(Step.NETWORK, f"{peer}: {exc.strerror or exc}", peer))
            sock.close()
            continue
        return _over_tls(sock, tls, peer, timeout, deadline)
    if failures:
        return failures[0]
    if infos:
        return ProbeResult(Step.TIMEOUT, f"no answer from {host} within {2 * timeout:g} s")
    return ProbeResult(Step.DNS, f"{host} resolves to nothing")


def _over_tls(
    sock: socket.socket, tls: TlsMaterial, peer: str, timeout: float, deadline: float
) -> ProbeResult:
    try:
        # The handshake as one step (CPython bounds it as a whole by the socket's timeout).
        sock.settimeout(min(timeout, max(deadline - time.monotonic(), 0.001)))
        with client_context(tls).wrap_socket(sock, server_hostname=tls.server_name) as conn:
            outcome = _h2_ping(conn, tls, deadline)
    except ssl.SSLError as exc:
        closed = isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError)
        return ProbeResult(
            Step.CLOSED if closed else Step.TLS, tls_reason(exc, tls.server_name), peer
        )
    except TimeoutError:
        return ProbeResult(
            Step.TIMEOUT, f"{peer} accepted but did not finish TLS/HTTP/2 within {timeout:g} s",
            peer,
        )
    except (ConnectionResetError, BrokenPipeError):
        return ProbeResult(Step.CLOSED, f"{peer} closed the connection during the TLS handshake",
                           peer)
    except OSError as exc:
        return ProbeResult(Step.NETWORK, f"{peer}: {exc.strerror or exc}", peer)
    finally:
        sock.close()
    if isinstance(outcome, ProbeResult):
        return ProbeResult(outcome.step, outcome.reason, peer)
    rtt = f"round trip {outcome * 1000:.1f} ms"
    return ProbeResult(Step.OK, f"{peer} answered (TLS, HTTP/2), {rtt}", peer, outcome)
