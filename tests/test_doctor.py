"""`elkeid-agent doctor` and the agent's own dial diagnosis name the same, precise cause.

Six situations against the real local center over mutual TLS: a good center, a stopped one, a
server certificate for another name, one from another CA, an expired client certificate, a name
that does not resolve. `doctor` gives six different one-line reasons; the running agent logs the
same reasons (not "timed out") and puts them in status.json's detail and the heartbeat.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentproc import REPO, AgentProcess, patch_config, wait_until
from conftest import AgentConfig
from cryptography import x509

from elkeid_agent.config import TlsConfig
from elkeid_agent.doctor import Check, Verdict, cert_dates, checks
from elkeid_agent.status import read_status
from elkeid_agent.transport.certinfo import (
    CLIENT_AUTH,
    SERVER_AUTH,
    parse_pem,
    verify_client_cert,
)
from elkeid_agent.transport.probe import (
    Step,
    probe,
    read_frames,
    split_address,
    tls_reason,
)
from elkeid_agent.transport.tls import TlsMaterial
from elkeid_center.certs import (
    ensure_certs,
    generate_client_cert,
    generate_server_cert,
    generate_unrelated_certs,
)
from elkeid_center.testing import CenterThread

# --- the pure parts ------------------------------------------------------------------------------


def test_certinfo_reads_what_cryptography_reads(center: CenterThread, tmp_path: Path) -> None:
    expired, _ = generate_client_cert(center.certs, tmp_path, expired=True)
    for path, usage in (
        (center.certs.client_cert, (CLIENT_AUTH,)),
        (center.certs.server_cert, (SERVER_AUTH,)),
        (expired, (CLIENT_AUTH,)),
        (center.certs.ca, ()),
    ):
        info = parse_pem(path.read_bytes())
        ref = x509.load_pem_x509_certificate(path.read_bytes())
        assert info.not_before == ref.not_valid_before_utc
        assert info.not_after == ref.not_valid_after_utc
        assert info.extended_usage == usage
        cn = ref.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        assert info.subject == cn


def test_client_cert_verified_as_the_server_would(center: CenterThread, tmp_path: Path) -> None:
    ca = center.certs.ca.read_bytes()
    certs = center.certs
    assert verify_client_cert(ca, str(certs.client_cert), str(certs.client_key)) is None
    crt, key = generate_client_cert(certs, tmp_path, expired=True)
    assert verify_client_cert(ca, str(crt), str(key)) == "certificate has expired"
    other = generate_unrelated_certs(tmp_path / "other")
    assert verify_client_cert(ca, str(other.client_cert), str(other.client_key)) == (
        "unable to get local issuer certificate"
    )
    # A server certificate is not for client authentication.
    assert "purpose" in (verify_client_cert(ca, str(certs.server_cert), str(certs.server_key))
                         or "")


def test_tls_reasons_are_distinct() -> None:
    def verify(code: int, message: str) -> ssl.SSLCertVerificationError:
        exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
        exc.verify_code, exc.verify_message = code, message
        return exc

    name = tls_reason(verify(62, "Hostname mismatch"), "elkeid.com")
    ca = tls_reason(verify(20, "unable to get local issuer certificate"), "elkeid.com")
    expired = tls_reason(verify(10, "certificate has expired"), "elkeid.com")
    eof = tls_reason(ssl.SSLEOFError(8, "EOF"), "elkeid.com")
    assert "not for elkeid.com" in name
    assert "unknown CA" in ca
    assert "expired" in expired
    assert "closed the connection" in eof
    assert len({name, ca, expired, eof}) == 4


def test_read_frames_takes_complete_frames_only() -> None:
    settings = b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" + b"\x00\x03\x00\x00\x00\x64"
    ping_ack = b"\x00\x00\x08\x06\x01\x00\x00\x00\x00" + b"elkeidok"
    buffer = bytearray(settings + ping_ack[:5])
    frames = read_frames(buffer)
    assert [(f.type, f.flags) for f in frames] == [(4, 0)]
    assert bytes(buffer) == ping_ack[:5]
    buffer += ping_ack[5:]
    assert [(f.type, f.flags, f.payload) for f in read_frames(buffer)] == [(6, 1, b"elkeidok")]
    assert buffer == b""


@pytest.mark.parametrize("bad", ["nocolon", "host:", ":80", "host:0", "host:99999", "h:x"])
def test_split_address_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        split_address(bad)


def test_split_address_v6() -> None:
    assert split_address("[::1]:6751") == ("::1", 6751)


# --- six situations ------------------------------------------------------------------------------

# What each situation must say, in doctor's connect line and in the agent's log.
EXPECTED = {
    "good": "answered (TLS, HTTP/2), round trip",
    "stopped": "connection refused by 127.0.0.1:",
    "wrong-name": "TLS: the server's certificate is not for elkeid.com",
    "other-ca": "TLS: the server's certificate is from an unknown CA",
    "expired-client": "TLS: the server refused our client certificate (tls.cert: certificate "
    "has expired)",
    "unresolvable": "cannot resolve agentcenter.invalid",
}


def situation(name: str, tmp_path: Path) -> Iterator[tuple[CenterThread, Path]]:
    """A center and an agent config for one of the six situations."""
    certs_dir = tmp_path / "certs"
    kwargs: dict[str, Path] = {}
    if name == "wrong-name":
        pki = ensure_certs(certs_dir)
        crt, key = generate_server_cert(pki, tmp_path / "wrong", names=("other.example",))
        kwargs = {"server_cert": crt, "server_key": key}
    elif name == "other-ca":
        other = generate_unrelated_certs(tmp_path / "other")
        kwargs = {"server_cert": other.server_cert, "server_key": other.server_key}
    with CenterThread(certs_dir, **kwargs) as center:
        center.start()
        config = center.write_agent_config(tmp_path / "agent.toml", tmp_path / "work")
        (tmp_path / "work").mkdir()
        if name == "stopped":
            center.stop()
        elif name == "expired-client":
            crt, key = generate_client_cert(center.certs, tmp_path / "expired", expired=True)
            patch_config(config, tls={"cert": str(crt), "key": str(key)})
        elif name == "unresolvable":
            patch_config(config, regions={"default": {"private": "agentcenter.invalid:6751"}})
        yield center, config


@pytest.fixture(params=list(EXPECTED))
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    name: str = request.param
    for _, config in situation(name, tmp_path):
        yield name, config


def connect_lines(found: list[Check]) -> list[Check]:
    return [c for c in found if c.name.startswith("connect ")]


def test_doctor_names_each_situation(case: tuple[str, Path]) -> None:
    name, config = case
    found = list(checks(str(config), dict(os.environ)))
    [connect] = connect_lines(found)
    assert EXPECTED[name] in connect.detail, connect.line()
    assert connect.verdict is (Verdict.OK if name == "good" else Verdict.FAIL)
    tls_lines = {c.name: c for c in found if c.name.startswith("tls")}
    if name == "expired-client":
        assert tls_lines["tls.cert"].verdict is Verdict.FAIL
        assert "expired on" in tls_lines["tls.cert"].detail
        assert tls_lines["tls chain"].verdict is Verdict.FAIL
    else:
        assert all(c.verdict is Verdict.OK for c in tls_lines.values()), tls_lines
        assert "days left" in tls_lines["tls.cert"].detail


def test_six_reasons_are_six_different_lines(tmp_path: Path) -> None:
    lines = set()
    for i, name in enumerate(EXPECTED):
        for _, config in situation(name, tmp_path / str(i)):
            [connect] = connect_lines(list(checks(str(config), dict(os.environ))))
            lines.add(connect.detail.split(":", 1)[0] if name == "stopped" else connect.detail)
    assert len(lines) == 6


def test_doctor_command_exit_status(tmp_path: Path) -> None:
    for name, status in (("good", 0), ("stopped", 3)):
        for _, config in situation(name, tmp_path / name):
            done = subprocess.run(
                [sys.executable, "-m", "elkeid_agent", "doctor", "--config", str(config)],
                env={**os.environ, "PYTHONPATH": str(REPO)},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == status, done.stdout + done.stderr
            lines = done.stdout.splitlines()
            assert all(line.split()[0] in ("ok", "warn", "FAIL") for line in lines), lines
            assert EXPECTED[name] in done.stdout


def test_doctor_reads_specified_env(center: CenterThread, agent_config: AgentConfig) -> None:
    config = patch_config(agent_config(), regions={"east": {"private": "east.invalid:1"}})
    work = Path(str(read_work_dir(config)))
    work.mkdir()
    (work / "specified_env").write_text("specified_region=east\n")
    found = list(checks(str(config), {}))
    [connect] = connect_lines(found)
    assert connect.name == "connect private east.invalid:1"
    assert "cannot resolve east.invalid" in connect.detail
    # A region the config no longer has: passed over by `run`, and said here.
    (work / "specified_env").write_text("specified_region=west\n")
    [stale] = [c for c in checks(str(config), {}) if c.name == "specified_region"]
    assert stale.verdict is Verdict.WARN
    assert "'west' names no [regions.west]" in stale.detail


def test_doctor_work_dir_checks(center: CenterThread, agent_config: AgentConfig) -> None:
    config = agent_config()
    found = {c.name: c for c in checks(str(config), dict(os.environ))}
    assert found["work dir"].verdict is Verdict.OK
    assert "does not exist yet; run creates it in" in found["work dir"].detail
    work = read_work_dir(config)
    work.mkdir()
    found = {c.name: c for c in checks(str(config), dict(os.environ))}
    assert found["work dir"].verdict is Verdict.OK
    assert "GiB free" in found["free space"].detail
    assert found["exec"].verdict is Verdict.OK
    if os.geteuid() != 0:
        work.chmod(0o500)
        try:
            found = {c.name: c for c in checks(str(config), dict(os.environ))}
            assert found["work dir"].verdict is Verdict.FAIL
            assert "not writable" in found["work dir"].detail
        finally:
            work.chmod(0o700)


def test_doctor_cert_dates_warn_and_fail(center: CenterThread) -> None:
    pem = center.certs.client_cert.read_bytes()
    info = parse_pem(pem)
    soon = info.not_after - datetime.timedelta(days=10)
    assert cert_dates("tls.cert", "c.crt", pem, soon).verdict is Verdict.WARN
    later = info.not_after + datetime.timedelta(days=3)
    check = cert_dates("tls.cert", "c.crt", pem, later)
    assert check.verdict is Verdict.FAIL
    assert "3 days ago" in check.detail
    early = info.not_before - datetime.timedelta(days=1)
    assert "not valid until" in cert_dates("tls.cert", "c.crt", pem, early).detail
    server = center.certs.server_cert.read_bytes()
    now = datetime.datetime.now(datetime.UTC)
    assert "not for client authentication" in cert_dates("tls.cert", "s", server, now).detail


def read_work_dir(config: Path) -> Path:
    import tomllib

    return Path(tomllib.loads(config.read_text())["work_dir"])


# --- the agent says the same ---------------------------------------------------------------------


def test_agent_logs_the_same_reason(case: tuple[str, Path]) -> None:
    name, config = case
    patch_config(config, transport={"dial_timeout": 15.0, "backoff_initial": 0.5,
                                    "backoff_max": 1.0})
    started = time.monotonic()
    with AgentProcess(config) as agent:
        if name == "good":
            wait_until(lambda: "connected to" in agent.log(), 20)
        else:
            line = wait_until(
                lambda: next((x for x in agent.log().splitlines() if "dial " in x), ""), 20
            )
            assert EXPECTED[name] in line, line
            assert "timed out" not in agent.log()
            # Told apart at once, not after the 15 s dial timeout.
            assert time.monotonic() - started < 14
            status = wait_until(
                lambda: (s := read_status(agent.work_dir)) and s.detail and s, 10
            )
            assert any(EXPECTED[name] in d for d in status.detail), status.detail
            assert status.connected is False
        agent.signal(signal.SIGTERM)
        assert agent.wait(20) == 0


def test_heartbeat_carries_the_dial_reason(
    center: CenterThread, agent_config: AgentConfig
) -> None:
    config = agent_config(transport={"heartbeat_interval": 0.5, "backoff_initial": 0.3,
                                     "backoff_max": 0.5})
    center.stop()
    with AgentProcess(config) as agent:
        wait_until(lambda: "connection refused" in agent.log(), 20)
        time.sleep(1.5)  # a heartbeat or two queue up while disconnected
        center.start()
        # The beats queued while disconnected (spooled, so they may follow the fresh one that
        # opens the stream) say abnormal and why.
        beats = wait_until(
            lambda: [
                b for b in center.records(1000)
                if b.fields["state"] == "abnormal"
                and "connection refused by 127.0.0.1" in b.fields.get("state_detail", "")
            ],
            30,
        )
        assert beats
        agent.stop()


def test_probe_against_good_center_measures_rtt(
    center: CenterThread, tls_material: TlsMaterial
) -> None:
    result = probe(center.address, tls_material, 5)
    assert result.step is Step.OK
    assert 0 < result.rtt < 5


@pytest.fixture
def tls_material(center: CenterThread) -> TlsMaterial:
    return TlsMaterial.load(
        TlsConfig(
            ca=str(center.certs.ca),
            cert=str(center.certs.client_cert),
            key=str(center.certs.client_key),
        )
    )


def test_probe_names_a_server_that_closes_or_stays_silent(tls_material: TlsMaterial) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        address = f"127.0.0.1:{listener.getsockname()[1]}"

        def close_at_once() -> None:
            conn, _ = listener.accept()
            conn.close()

        closer = threading.Thread(target=close_at_once)
        closer.start()
        result = probe(address, tls_material, 5)
        closer.join()
        assert result.step is Step.CLOSED
        assert "closed the connection during the TLS handshake" in result.reason
        # Accepted by the kernel (backlog), never answered: a timeout, named as such.
        result = probe(address, tls_material, 0.5)
        assert result.step is Step.TIMEOUT
        assert "did not finish TLS/HTTP/2 within 0.5 s" in result.reason


def test_probe_gives_up_on_a_server_that_drips_within_twice_its_timeout(
    center: CenterThread, tls_material: TlsMaterial
) -> None:
    # The TLS handshake is fine, then an HTTP/2 frame arrives before each socket timeout but
    # never the PING's ACK: only a deadline over the whole dial ends the probe. Without one it
    # ran as long as the peer talked: the agent's probe thread outlived its caller's timeout,
    # and a few of them took every worker thread the agent has (downloads, disk writes, host
    # facts all wait for one).
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(center.certs.server_cert, center.certs.server_key)
    server.set_alpn_protocols(["h2"])
    stop = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        address = f"127.0.0.1:{listener.getsockname()[1]}"

        def chatter() -> None:
            raw, _ = listener.accept()
            with server.wrap_socket(raw, server_side=True) as conn:
                conn.recv(65536)
                # An empty WINDOW_UPDATE-like frame of an unknown type, again and again.
                while not stop.wait(0.2):
                    try:
                        conn.sendall(b"\x00\x00\x00\xfe\x00\x00\x00\x00\x00")
                    except OSError:
                        return

        talker = threading.Thread(target=chatter)
        talker.start()
        started = time.monotonic()
        try:
            result = probe(address, tls_material, 0.5)
        finally:
            took = time.monotonic() - started
            stop.set()
            talker.join()
    assert took < 2.5, f"the probe took {took:.1f} s"
    assert result.step is Step.TIMEOUT


@pytest.mark.parametrize("host", ["a" * 64 + ".example", "x..y", "a\x00b"])
def test_probe_names_a_host_the_resolver_refuses(tls_material: TlsMaterial, host: str) -> None:
    # The name comes from the config or a service discovery answer: the resolver's refusal
    # (UnicodeError from the idna codec, ValueError for a NUL) is a DNS result, not an
    # exception out of `doctor` or out of the agent's diagnosis.
    result = probe(f"{host}:443", tls_material, 1)
    assert result.step is Step.DNS
    assert "cannot resolve" in result.reason


def test_service_discovery_failure_reaches_doctor_log_and_status(
    center: CenterThread, agent_config: AgentConfig
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    config = agent_config()
    data = patch_config(config, transport={"backoff_initial": 0.3, "backoff_max": 0.5})
    text = data.read_text().replace(f'private = "{center.address}"',
                                    f'service_discovery = "{dead}"')
    config.write_text(text)
    read_work_dir(config).mkdir()
    found = {c.name: c for c in checks(str(config), dict(os.environ))}
    sd = found[f"service discovery {dead}"]
    assert sd.verdict is Verdict.FAIL
    assert "refused" in sd.detail.lower() or "connect call failed" in sd.detail.lower()
    with AgentProcess(config) as agent:
        status = wait_until(lambda: (s := read_status(agent.work_dir)) and s.detail and s, 20)
        assert any(f"service discovery failed: {dead}" in d for d in status.detail), status.detail
        assert f"service discovery failed: {dead}" in agent.log()
        agent.stop()
