"""The local center alone, driven by real grpc mTLS clients on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import ssl
import stat
import struct
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from elkeid_agent._proto import grpc_pb2
from elkeid_agent.config import load_config
from elkeid_agent.signing.check import verifier_from
from elkeid_agent.signing.keys import Policy
from elkeid_center.certs import (
    SERVER_NAME,
    CertFiles,
    generate_certs,
    generate_server_cert,
    generate_unrelated_certs,
)
from elkeid_center.cli import format_record, resolve_configs
from elkeid_center.testing import (
    UPLOAD_METHOD,
    CenterThread,
    TransferClient,
    client_channel,
    write_agent_config,
)

FIXTURES = Path(__file__).resolve().parent / "data" / "elkeid-go"
REPO = Path(__file__).resolve().parent.parent


def payload(**fields: str) -> bytes:
    return grpc_pb2.Payload(fields=fields).SerializeToString()


def packaged(*records: tuple[int, int, bytes], agent_id: str = "agent-1") -> bytes:
    pd = grpc_pb2.PackagedData(
        records=[grpc_pb2.EncodedRecord(data_type=t, timestamp=ts, data=d) for t, ts, d in records],
        agent_id=agent_id,
        hostname="host",
        version="1.0.0",
        product="elkeid-agent",
    )
    return pd.SerializeToString()


def heartbeat(agent_id: str = "agent-1") -> bytes:
    return packaged((1000, 1700000000, payload(state="running")), agent_id=agent_id)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return generate_certs(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def center(certs: CertFiles, tmp_path: Path) -> Iterator[CenterThread]:
    files = tmp_path / "files"
    files.mkdir()
    with CenterThread(certs.directory, files_dir=files) as c:
        yield c


@pytest.fixture
def channel(center: CenterThread) -> Iterator[grpc.Channel]:
    ch = client_channel(center.address, center.certs)
    yield ch
    ch.close()


def open_stream(ch: grpc.Channel) -> TransferClient:
    return TransferClient(ch)


# --- certificates -------------------------------------------------------------------


def test_certs_layout_names_and_modes(certs: CertFiles) -> None:
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    client = x509.load_pem_x509_certificate(certs.client_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [SERVER_NAME]
    assert server.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == SERVER_NAME
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    for key in (certs.ca_key, certs.server_key, certs.client_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_unrelated_and_wrong_name_certs(certs: CertFiles, tmp_path: Path) -> None:
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    other = generate_unrelated_certs(tmp_path / "other")
    other_server = x509.load_pem_x509_certificate(other.server_cert.read_bytes())
    with pytest.raises((ValueError, TypeError)):
        other_server.verify_directly_issued_by(ca)
    cert_path, key_path = generate_server_cert(certs, tmp_path / "wrong")
    wrong = x509.load_pem_x509_certificate(cert_path.read_bytes())
    wrong.verify_directly_issued_by(ca)
    san = wrong.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert SERVER_NAME not in san.get_values_for_type(x509.DNSName)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


# --- Transfer -----------------------------------------------------------------------


def test_raw_packageddata_is_kept_and_decoded(center: CenterThread, channel: grpc.Channel) -> None:
    stream = open_stream(channel)
    raw = packaged(
        (9999, 1700000001, payload(exe="/bin/sh", argv="sh -c true")),
        (9999, 1700000002, b"\xff\xff not a payload"),
    )
    stream.send(raw)
    records = center.wait_records(9999, count=2)
    assert [(r.data_type, r.timestamp) for r in records] == [(9999, 1700000001), (9999, 1700000002)]
    assert records[0].fields == {"exe": "/bin/sh", "argv": "sh -c true"}
    assert records[0].raw == payload(exe="/bin/sh", argv="sh -c true")
    assert records[1].fields == {}
    assert not records[1].payload_ok
    assert records[1].raw == b"\xff\xff not a payload"
    (got,) = center.packaged()
    assert got.raw == raw
    assert got.decoded.agent_id == "agent-1"
    assert got.decoded.product == "elkeid-agent"
    assert abs(got.recv_time - time.time()) < 10
    (conn,) = center.connections()
    assert conn.agent_id == "agent-1"
    assert conn.closed_at is None
    assert center.packaged(connection=conn.id) == [got]
    stream.close()
    assert stream.wait_end() == grpc.StatusCode.OK
    center.wait_for(lambda: center.connections()[0].closed_at)
    assert "[1] 9999 1700000001" in format_record(records[0])


def test_gzip_compressed_messages_are_accepted(center: CenterThread) -> None:
    with client_channel(center.address, center.certs, compression=grpc.Compression.Gzip) as ch:
        stream = open_stream(ch)
        big = "x" * 100_000
        raw = packaged((9999, 1, payload(big=big)))
        stream.send(raw)
        (record,) = center.wait_records(9999)
        assert record.fields == {"big": big}
        assert center.packaged()[0].raw == raw
        stream.close()


def test_client_without_certificate_is_refused(center: CenterThread) -> None:
    with client_channel(center.address, center.certs, client_cert=False) as ch:
        stream = open_stream(ch)
        stream.send(heartbeat())
        with pytest.raises(grpc.RpcError) as err:
            stream.recv(timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert center.connections() == []


def test_client_from_another_ca_is_refused(center: CenterThread, tmp_path: Path) -> None:
    other = generate_unrelated_certs(tmp_path / "other")
    # Trusts the right CA for the server, but presents a client cert of another CA.
    mixed = CertFiles(tmp_path / "mixed")
    mixed.directory.mkdir()
    mixed.ca.write_bytes(center.certs.ca.read_bytes())
    mixed.client_cert.write_bytes(other.client_cert.read_bytes())
    mixed.client_key.write_bytes(other.client_key.read_bytes())
    with client_channel(center.address, mixed) as ch:
        stream = open_stream(ch)
        stream.send(heartbeat())
        with pytest.raises(grpc.RpcError) as err:
            stream.recv(timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert center.connections() == []


@pytest.mark.parametrize("kind", ["unrelated-ca", "wrong-name"])
def test_center_with_bad_server_cert_fails_client_verification(
    certs: CertFiles, tmp_path: Path, kind: str
) -> None:
    if kind == "unrelated-ca":
        other = generate_unrelated_certs(tmp_path / "other")
        cert, key = other.server_cert, other.server_key
    else:
        cert, key = generate_server_cert(certs, tmp_path / "wrong")
    with (
        CenterThread(certs.directory, server_cert=cert, server_key=key) as bad,
        client_channel(bad.address, certs) as ch,
    ):
        stream = open_stream(ch)
        stream.send(heartbeat())
        with pytest.raises(grpc.RpcError) as err:
            stream.recv(timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert bad.connections() == []


def test_first_heartbeat_pushes_configs_once_per_stream(
    center: CenterThread, channel: grpc.Channel
) -> None:
    configs: list[dict[str, Any]] = [
        {
            "name": "collector",
            "type": "tar.gz",
            "version": "1.2.3",
            "sha256": "ab" * 32,
            "download_urls": ["http://127.0.0.1:1/collector.tar.gz"],
            "detail": "x",
        },
        {"name": "driver", "version": "2"},
    ]
    center.set_configs(configs)
    stream = open_stream(channel)
    stream.send(packaged((9999, 1, payload(k="v"))))
    center.wait_records(9999)
    assert stream.recv(timeout=0.5) is None
    stream.send(heartbeat())
    command = stream.recv()
    assert command is not None
    assert not command.HasField("task")
    assert [c.name for c in command.configs] == ["collector", "driver"]
    assert list(command.configs[0].download_urls) == ["http://127.0.0.1:1/collector.tar.gz"]
    assert command.configs[0].sha256 == "ab" * 32
    stream.send(heartbeat())
    center.wait_records(1000, count=2)
    assert stream.recv(timeout=0.5) is None
    # A new stream (the agent reconnecting) gets them again on its first heartbeat.
    second = open_stream(channel)
    second.send(heartbeat())
    again = second.recv()
    assert again is not None
    assert [c.name for c in again.configs] == ["collector", "driver"]
    first_hb = [c.first_heartbeat_at for c in center.connections()]
    assert all(t is not None for t in first_hb)
    with pytest.raises(ValueError, match="unknown Config"):
        center.set_configs([{"name": "x", "bogus": 1}])


def test_configs_can_be_set_before_start(certs: CertFiles) -> None:
    center = CenterThread(certs.directory)
    center.set_configs([{"name": "early", "version": "1"}])
    assert center.send_task(1060, "elkeid-agent") == 0
    with center, client_channel(center.address, certs) as ch:
        stream = open_stream(ch)
        stream.send(heartbeat())
        command = stream.recv()
        assert command is not None
        assert [c.name for c in command.configs] == ["early"]


def test_no_configs_set_means_no_push(center: CenterThread, channel: grpc.Channel) -> None:
    stream = open_stream(channel)
    stream.send(heartbeat())
    center.wait_records(1000)
    assert stream.recv(timeout=0.5) is None


def test_tasks_and_configs_to_latest_or_all(center: CenterThread, channel: grpc.Channel) -> None:
    assert center.send_task(1060, "elkeid-agent") == 0
    # Opened one after the other so the server numbers them in this order.
    first = open_stream(channel)
    first.send(heartbeat("a"))
    center.wait_for(lambda: [c for c in center.open_connections() if c.agent_id == "a"])
    second = open_stream(channel)
    second.send(heartbeat("b"))
    center.wait_for(lambda: len(center.open_connections()) == 2)
    assert center.send_task(1050, "elkeid-agent", {"path": "/x", "buf_size": 10}, "tok") == 2
    for stream in (first, second):
        command = stream.recv()
        assert command is not None
        assert command.task.data_type == 1050
        assert command.task.object_name == "elkeid-agent"
        assert json.loads(command.task.data) == {"path": "/x", "buf_size": 10}
        assert command.task.token == "tok"
    assert center.send_task(1234, "plugin", "raw", "t2", target="latest") == 1
    latest = second.recv()
    assert latest is not None
    assert latest.task.data == "raw"
    assert first.recv(timeout=0.3) is None
    assert center.send_configs([{"name": "p", "version": "9"}], target="latest") == 1
    pushed = second.recv()
    assert pushed is not None
    assert [c.version for c in pushed.configs] == ["9"]
    a_id = center.connections()[0].id
    assert center.send_task(1, "x", target=a_id) == 1
    only_a = first.recv()
    assert only_a is not None
    assert only_a.task.object_name == "x"


def test_raw_command_bytes_are_sent_verbatim(
    center: CenterThread, channel: grpc.Channel
) -> None:
    stream = open_stream(channel)
    stream.send(heartbeat())
    center.wait_records(1000)
    task = grpc_pb2.Command(task=grpc_pb2.Task(data_type=7, object_name="p", token="t"))
    # An unknown field 15 (varint 1) after the task: the protobuf API could not build it.
    raw = task.SerializeToString() + b"\x78\x01"
    assert center.send_raw_command(raw) == 1
    got = stream.recv()
    assert got is not None
    assert (got.task.data_type, got.task.token) == (7, "t")
    assert got.SerializeToString() == raw
    # b"" is the empty Command: neither a Task nor Configs.
    assert center.send_raw_command(b"", target="latest") == 1
    empty = stream.recv()
    assert empty is not None
    assert not empty.HasField("task")
    assert empty.ByteSize() == 0


def test_stop_breaks_streams_and_restart_keeps_port(
    center: CenterThread, channel: grpc.Channel
) -> None:
    port = center.port
    stream = open_stream(channel)
    stream.send(heartbeat())
    center.wait_connected()
    center.stop()
    assert not center.running
    assert stream.wait_end() == grpc.StatusCode.UNAVAILABLE
    assert center.connections()[0].closed_at is not None
    # Service discovery keeps answering while the gRPC server is down.
    answer = json.loads(http_get(f"http://{center.sd_address}/registry/detail?name=hids_svr_grpc"))
    assert answer["data"][0]["port"] == port
    center.start()
    assert center.port == port
    again = open_stream(channel)
    again.send(heartbeat("again"))
    assert center.wait_connected(agent_id="again").closed_at is None
    center.restart()
    assert center.port == port
    assert again.wait_end() == grpc.StatusCode.UNAVAILABLE


def test_disconnect_ends_streams_server_stays(center: CenterThread, channel: grpc.Channel) -> None:
    stream = open_stream(channel)
    stream.send(heartbeat())
    center.wait_connected()
    assert center.disconnect() == 1
    assert stream.wait_end() == grpc.StatusCode.UNAVAILABLE
    fresh = open_stream(channel)
    fresh.send(heartbeat())
    center.wait_for(lambda: len(center.open_connections()) == 1)


def test_malformed_packageddata_cuts_the_stream(
    center: CenterThread, channel: grpc.Channel
) -> None:
    stream = open_stream(channel)
    stream.send(b"\x0a\xff\xff\xff")  # field 1 with a length running past the end
    assert stream.wait_end() == grpc.StatusCode.UNAVAILABLE
    assert center.decode_errors == 1
    assert center.packaged() == []


def test_messages_over_10_mib_are_refused(center: CenterThread, channel: grpc.Channel) -> None:
    stream = open_stream(channel)
    stream.send(packaged((9999, 1, payload(big="x" * (10 * 1024 * 1024)))))
    assert stream.wait_end() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert center.packaged() == []


def read_fixture(name: str) -> list[bytes]:
    data = (FIXTURES / name).read_bytes()
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("<I", data, pos)
        out.append(data[pos + 4 : pos + 4 + length])
        pos += 4 + length
    assert pos == len(data)
    return out


def test_go_agent_capture_decodes_like_its_description(
    center: CenterThread, channel: grpc.Channel
) -> None:
    messages = read_fixture("go-agent-packageddata.bin")
    described = [
        json.loads(line)
        for line in (FIXTURES / "go-agent-packageddata.jsonl").read_text().splitlines()
    ]
    assert len(messages) == len(described) == 14
    stream = open_stream(channel)
    for raw in messages:
        stream.send(raw)
    got = center.wait_for(lambda: p if len(p := center.packaged()) == 14 else [])
    for (raw, decoded, _), sent, want in zip(got, messages, described, strict=True):
        assert raw == sent
        for key in ("agent_id", "hostname", "version", "product"):
            assert getattr(decoded, key) == want[key]
        for key in ("intranet_ipv4", "extranet_ipv4", "intranet_ipv6", "extranet_ipv6"):
            assert list(getattr(decoded, key)) == want[key]
        assert len(decoded.records) == want["record_count"]
        counts = Counter(str(r.data_type) for r in decoded.records)
        assert counts == Counter(want["data_types"])
    records = center.records()
    expected = [r for m in described for r in m["records"]]
    assert len(records) == len(expected) == sum(m["record_count"] for m in described)
    for record, want in zip(records, expected, strict=True):
        assert (record.data_type, record.timestamp) == (want["data_type"], want["timestamp"])
        assert len(record.raw) == want["data_len"]
        if "fields" in want:
            assert record.fields == want["fields"]
        if "seq" in want:
            assert record.fields["seq"] == str(want["seq"])
    assert [int(r.fields["seq"]) for r in center.records(9999)] == list(range(401))
    (conn,) = center.connections()
    assert conn.agent_id == "fixture-agent"
    assert conn.first_heartbeat_at is not None


# --- FileExt.Upload -----------------------------------------------------------------


def upload(ch: grpc.Channel, token: str, chunks: list[bytes]) -> grpc_pb2.FileUploadResponse:
    call = ch.stream_unary(
        UPLOAD_METHOD,
        request_serializer=grpc_pb2.FileUploadRequest.SerializeToString,
        response_deserializer=grpc_pb2.FileUploadResponse.FromString,
    )

    def requests() -> Iterator[grpc_pb2.FileUploadRequest]:
        for chunk in chunks:
            yield grpc_pb2.FileUploadRequest(token=token, data=chunk)
            time.sleep(0.05)

    response: grpc_pb2.FileUploadResponse = call(requests(), timeout=30)
    return response


def test_upload_arrives_intact_with_chunk_times(
    center: CenterThread, channel: grpc.Channel
) -> None:
    chunks = [os.urandom(500 * 1024), os.urandom(500 * 1024), b"tail"]
    response = upload(channel, "up-1", chunks)
    assert response.status == grpc_pb2.FileUploadResponse.SUCCESS
    got = center.uploads["up-1"]
    assert got.data == b"".join(chunks)
    assert got.complete
    assert got.chunk_sizes == (500 * 1024, 500 * 1024, 4)
    assert len(got.chunk_times) == 3
    assert got.chunk_times[2] - got.chunk_times[0] >= 0.09
    center.set_upload_status(failed=True)
    assert upload(channel, "up-2", [b"x"]).status == grpc_pb2.FileUploadResponse.FAILED
    assert set(center.uploads) == {"up-1", "up-2"}


# --- service discovery and files ----------------------------------------------------


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
        return body


def test_service_discovery_answers_configured_list(center: CenterThread) -> None:
    base = f"http://{center.sd_address}/registry/detail"
    default = json.loads(http_get(f"{base}?name=hids_svr_grpc&count=10"))
    assert default["msg"] == "ok"
    assert [(d["ip"], d["port"]) for d in default["data"]] == [("127.0.0.1", center.port)]
    center.set_sd_backends([("127.0.0.1", 1), ("10.255.255.1", 6751, 5), ("127.0.0.1", 2)])
    answer = json.loads(http_get(f"{base}?name=hids_svr_grpc&count=10"))
    assert [(d["ip"], d["port"], d["weight"]) for d in answer["data"]] == [
        ("127.0.0.1", 1, 1),
        ("10.255.255.1", 6751, 5),
        ("127.0.0.1", 2, 1),
    ]
    assert len(json.loads(http_get(f"{base}?name=hids_svr_grpc&count=2"))["data"]) == 2
    assert json.loads(http_get(f"{base}?name=other&count=10"))["data"] == []
    center.set_sd_status(503)
    with pytest.raises(urllib.error.HTTPError) as err:
        http_get(f"{base}?name=hids_svr_grpc&count=10")
    assert err.value.code == 503
    err.value.close()
    assert len(center.sd_requests()) == 5


def test_file_server_serves_and_logs(center: CenterThread, tmp_path: Path) -> None:
    blob = os.urandom(300_000)
    (tmp_path / "files" / "sub").mkdir()
    (tmp_path / "files" / "sub" / "p.tar.gz").write_bytes(blob)
    (tmp_path / "secret").write_text("no")
    assert http_get(center.file_url("sub/p.tar.gz")) == blob
    for missing in ("nope", "../secret", "%2e%2e/secret", "a%00b", "sub"):
        with pytest.raises(urllib.error.HTTPError) as err:
            http_get(center.file_url(missing))
        assert err.value.code == 404
        err.value.close()
    assert center.file_requests()[0] == "/sub/p.tar.gz"
    assert len(center.file_requests()) == 6


def test_http_rejects_garbage_request(center: CenterThread) -> None:
    with socket.create_connection(("127.0.0.1", center.sd_port), timeout=10) as sock:
        sock.sendall(b"garbage\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")


# --- agent config and CLI -----------------------------------------------------------


def test_agent_config_schema(center: CenterThread, tmp_path: Path) -> None:
    path = write_agent_config(
        tmp_path / "a.toml",
        tmp_path / "work",
        center.certs.directory,
        {"default": {"service_discovery": "127.0.0.1:1", "private": "127.0.0.1:2"}},
        compression="gzip",
    )
    config = tomllib.loads(path.read_text())
    assert config == {
        "work_dir": str((tmp_path / "work").resolve()),
        "tls": {
            "ca": str(center.certs.ca.resolve()),
            "cert": str(center.certs.client_cert.resolve()),
            "key": str(center.certs.client_key.resolve()),
            "server_name": "elkeid.com",
        },
        "transport": {"compression": "gzip"},
        "regions": {"default": {"service_discovery": "127.0.0.1:1", "private": "127.0.0.1:2"}},
    }
    via_sd = center.write_agent_config(
        tmp_path / "b.toml", tmp_path / "w", via="service_discovery", buffer_bytes=1 << 20
    )
    config = tomllib.loads(via_sd.read_text())
    assert config["regions"] == {"default": {"service_discovery": center.sd_address}}
    assert config["buffer"] == {"max_bytes": 1 << 20}
    assert config["transport"] == {"compression": "none"}
    with pytest.raises(ValueError, match="unknown"):
        write_agent_config(tmp_path / "c.toml", tmp_path, center.certs.directory, {"r": {"x": "y"}})


def test_cli_serve_prints_records_and_send_pushes(tmp_path: Path) -> None:
    directory = tmp_path / "center"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "elkeid_center"]
    with subprocess.Popen(
        [*cmd, "serve", "--dir", str(directory), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    ) as proc:
        try:
            assert proc.stdout is not None
            banner = [proc.stdout.readline() for _ in range(8)]
            assert banner[-1].strip().endswith(f"elkeid-agent run --config {directory}/agent.toml")
            config = tomllib.loads((directory / "agent.toml").read_text())
            assert config["work_dir"] == str(directory / "agent-work")
            address = config["regions"]["default"]["private"]
            sd = config["regions"]["default"]["service_discovery"]
            sd_answer = json.loads(http_get(f"http://{sd}/registry/detail?name=hids_svr_grpc"))
            assert f"{sd_answer['data'][0]['ip']}:{sd_answer['data'][0]['port']}" == address
            with client_channel(address, CertFiles(directory)) as ch:
                stream = open_stream(ch)
                stream.send(packaged((1000, 1700000000, payload(state="running"))))
                assert "stream from" in proc.stdout.readline()
                line = proc.stdout.readline()
                assert line.startswith("[1] 1000 heartbeat 1700000000 ")
                assert json.loads(line.split(" ", 4)[4]) == {"state": "running"}
                task = '{"data_type":1060,"object_name":"elkeid-agent","data":"","token":"t1"}'
                sent = subprocess.run(
                    [*cmd, "send", "--dir", str(directory), "--task", task],
                    capture_output=True,
                    text=True,
                    env=env,
                    cwd=REPO,
                    check=True,
                )
                assert sent.stdout.strip() == "sent to 1 stream(s)"
                command = stream.recv()
                assert command is not None
                assert (command.task.data_type, command.task.token) == (1060, "t1")
                configs_file = tmp_path / "configs.json"
                configs_file.write_text(json.dumps([{"name": "p", "version": "1"}]))
                subprocess.run(
                    [*cmd, "send", "--dir", str(directory), "--configs", str(configs_file)],
                    capture_output=True,
                    env=env,
                    cwd=REPO,
                    check=True,
                )
                pushed = stream.recv()
                assert pushed is not None
                assert [c.name for c in pushed.configs] == ["p"]
                bad = subprocess.run(
                    [*cmd, "send", "--dir", str(directory), "--task", '{"bogus": 1}'],
                    capture_output=True,
                    text=True,
                    env=env,
                    cwd=REPO,
                    check=False,
                )
                assert bad.returncode == 1
                assert "unknown Task field" in bad.stderr
                stream.close()
        finally:
            proc.terminate()
            assert proc.wait(timeout=20) == 0
    assert not (directory / "admin.port").exists()


def test_aio_client_on_another_event_loop(center: CenterThread) -> None:
    # The agent runs grpc.aio on the main thread's loop while the center runs its own
    # loop in a thread: both must work in one process.
    center.set_configs([{"name": "p", "version": "1"}])

    async def agent() -> grpc_pb2.Command:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=center.certs.ca.read_bytes(),
            private_key=center.certs.client_key.read_bytes(),
            certificate_chain=center.certs.client_cert.read_bytes(),
        )
        async with grpc.aio.secure_channel(
            center.address, credentials, options=[("grpc.ssl_target_name_override", SERVER_NAME)]
        ) as ch:
            call = ch.stream_stream(
                "/grpc.Transfer/Transfer",
                request_serializer=None,
                response_deserializer=grpc_pb2.Command.FromString,
            )()
            await call.write(heartbeat("aio"))
            command: grpc_pb2.Command = await asyncio.wait_for(call.read(), 10)
            await call.done_writing()
            return command

    command = asyncio.run(agent())
    assert [c.name for c in command.configs] == ["p"]
    assert center.connections()[0].agent_id == "aio"


def test_too_frequent_client_pings_close_the_connection(center: CenterThread) -> None:
    # Like the AgentCenter: pings without data closer than 5 s apart are strikes, and
    # after max_ping_strikes (2) the server sends GOAWAY too_many_pings.
    with client_channel(
        center.address,
        center.certs,
        options=[
            ("grpc.keepalive_time_ms", 500),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ],
    ) as ch:
        stream = open_stream(ch)
        stream.send(heartbeat())
        center.wait_connected()
        with pytest.raises(grpc.RpcError) as err:
            stream.recv(timeout=20)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "ping" in (err.value.details() or "").lower()


def test_https_file_server_verifies_against_the_ca(certs: CertFiles, tmp_path: Path) -> None:
    (tmp_path / "agent.bin").write_bytes(b"payload")
    with CenterThread(certs.directory, files_dir=tmp_path, files_tls=True) as center:
        url = center.file_url("agent.bin")
        assert url.startswith("https://127.0.0.1:")
        trusting = ssl.create_default_context(cafile=str(certs.ca))
        with urllib.request.urlopen(url, timeout=10, context=trusting) as response:
            assert response.read() == b"payload"
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(url, timeout=10, context=ssl.create_default_context())


# --- the CLI as a tool: uploads saved, examples served, errors that name the file -------------


class Serve:
    """`elkeid-center serve` as `make center` runs it, in a subprocess."""

    def __init__(self, directory: Path, *extra: str) -> None:
        self.directory = directory
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.cmd = [sys.executable, "-m", "elkeid_center"]
        self.proc = subprocess.Popen(
            [*self.cmd, "serve", "--dir", str(directory), "--port", "0", *extra],
            stdout=subprocess.PIPE,
            text=True,
            env=self.env,
            cwd=REPO,
        )
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout
        self.banner = [self.stdout.readline() for _ in range(7)]
        config = tomllib.loads((directory / "agent.toml").read_text())
        self.address = config["regions"]["default"]["private"]

    def send(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.cmd, "send", "--dir", str(self.directory), *args],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=REPO,
            check=False,
        )

    def line_with(self, text: str) -> str:
        while True:
            line = self.stdout.readline()
            assert line, f"serve ended before printing {text!r}"
            if text in line:
                return line

    def close(self) -> None:
        self.proc.terminate()
        assert self.proc.wait(timeout=20) == 0
        self.stdout.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    s = Serve(tmp_path / "center", "--files", str(REPO / "examples" / "files"),
              "--configs", str(REPO / "examples" / "plugins.json"))
    try:
        yield s
    finally:
        s.close()


def test_cli_saves_uploads_with_path_and_sha256(serve: Serve) -> None:
    task = json.dumps({"data_type": 1050, "object_name": "elkeid-agent", "token": "t/1",
                       "data": json.dumps({"path": "/etc/host name", "buf_size": 4})})
    with client_channel(serve.address, CertFiles(serve.directory)) as ch:
        stream = open_stream(ch)
        stream.send(heartbeat())
        assert stream.recv() is not None  # the Configs
        assert serve.send("--task", task).returncode == 0
        assert upload(ch, "t/1", [b"abcd", b"ef"]).status == grpc_pb2.FileUploadResponse.SUCCESS
        line = serve.line_with("upload ")
        saved = serve.directory / "uploads" / "t_1-host_name"
        digest = hashlib.sha256(b"abcdef").hexdigest()
        assert line.strip() == (
            f"upload 't/1' (/etc/host name): 6 bytes saved to {saved} sha256 {digest}"
        )
        assert saved.read_bytes() == b"abcdef"
        # An upload nobody asked this center for is still kept, under its token.
        upload(ch, "..", [b"x"])
        assert "saved to" in serve.line_with("upload ")
        assert [p.name for p in (serve.directory / "uploads").iterdir()].count("t_1-host_name")
        stream.close()


def test_make_center_serves_examples_plugins_as_is(serve: Serve) -> None:
    with client_channel(serve.address, CertFiles(serve.directory)) as ch:
        stream = open_stream(ch)
        stream.send(heartbeat())
        command = stream.recv()
        assert command is not None
        [config] = command.configs
        assert config.name == "demo"
        [url] = config.download_urls
        assert url.startswith("http://127.0.0.1:")
        assert url.endswith("/demo")
        body = http_get(url)
        assert body == (REPO / "examples" / "files" / "demo").read_bytes()
        assert config.sha256 == hashlib.sha256(body).hexdigest()
        stream.close()


def test_center_sign_serves_signed_plugins_and_pins_the_key(tmp_path: Path) -> None:
    s = Serve(tmp_path / "center", "--files", str(REPO / "examples" / "files"),
              "--configs", str(REPO / "examples" / "plugins.json"), "--sign")
    try:
        with client_channel(s.address, CertFiles(s.directory)) as ch:
            stream = open_stream(ch)
            stream.send(heartbeat())
            command = stream.recv()
            assert command is not None
            [config] = command.configs
            body = http_get(config.download_urls[0])
            stream.close()
    finally:
        s.close()
    assert config.sha256 == hashlib.sha256(body).hexdigest()
    plain = (REPO / "examples" / "files" / "demo").read_bytes()
    assert body.startswith(plain)
    assert len(body) > len(plain)
    agent = load_config(s.directory / "agent.toml", {})
    verifier = verifier_from(agent.signing)
    assert verifier.policy is Policy.ENFORCE
    served = tmp_path / "demo"
    served.write_bytes(body)
    assert verifier.check(served, "demo", config.version).problem is None
    assert verifier.check(served, "demo", "9.9.9").problem is not None


def test_examples_sha256_matches_the_plugin() -> None:
    configs = json.loads((REPO / "examples" / "plugins.json").read_text())
    files = REPO / "examples" / "files"
    blank = [{**c, "sha256": ""} for c in configs]
    computed = resolve_configs(blank, files, lambda name: f"http://x/{name}")
    assert [c["sha256"] for c in computed] == [c["sha256"] for c in configs]
    assert computed[0]["download_urls"] == ["http://x/demo"]
    assert os.access(files / "demo", os.X_OK)
    with pytest.raises(ValueError, match=r"Config 'demo'.*missing"):
        resolve_configs([{**blank[0], "download_urls": ["missing"]}], files, str)


def test_send_json_errors_name_file_and_line(serve: Serve, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"name": "p",\n   "version": 1,,}\n]\n')
    done = serve.send("--configs", str(bad))
    assert done.returncode == 1
    assert f"{bad}: line 3 column" in done.stderr
    unknown = tmp_path / "unknown.json"
    unknown.write_text('[{"name": "p", "bogus": 1}]')
    done = serve.send("--configs", str(unknown))
    assert done.returncode == 1
    assert str(unknown) in done.stderr
    assert "bogus" in done.stderr
    done = serve.send("--task", '{"data_type": 1060,')
    assert done.returncode == 1
    assert "--task: line 1 column" in done.stderr


def test_demo_names_record_types_and_keeps_its_directory() -> None:
    done = subprocess.run(
        [sys.executable, "tools/demo.py", "--keep", "--seconds", "8"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "  1000 heartbeat: {" in done.stdout
    assert "  5100 task result: {" in done.stdout
    # The signed demo plugin runs; the copy changed after signing is refused.
    assert "  5999 demo tick: {" in done.stdout
    assert "plugin tampered: signature: " in done.stdout
    assert "(changed after signing); refused (signing policy enforce)" in done.stdout
    kept = Path(done.stdout.split("kept ", 1)[1].split(":", 1)[0])
    try:
        assert (kept / "agent.toml").is_file()
        assert (kept / "work" / "log" / "elkeid-agent.log").is_file()
        assert (kept / "work" / "status.json").is_file()
    finally:
        shutil.rmtree(kept)
