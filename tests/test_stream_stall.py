"""A server that takes the Transfer stream and stops reading it: the agent gives up on it.

HTTP/2 flow control parks `call.write` once the server stops consuming; keepalive pings are
still answered by its transport, so nothing else ever notices. Without a deadline on each
write the send loop waited forever on that server: no reconnect, no other AgentCenter, the
buffer full and every plugin held in backpressure.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import uvloop

from elkeid_agent.buffer import RecordBuffer
from elkeid_agent.config import Config, RegionConfig, TlsConfig, TransportConfig
from elkeid_agent.transport import stream
from elkeid_agent.transport.stream import TransferLoop
from elkeid_agent.transport.tls import TlsMaterial
from elkeid_agent.wire import encode_record
from elkeid_center.certs import CertFiles, ensure_certs


@pytest.fixture
def certs(tmp_path: Path) -> CertFiles:
    return ensure_certs(tmp_path / "certs")


class DeafServer:
    """A Transfer service that accepts every stream and never reads from it."""

    def __init__(self, certs: CertFiles) -> None:
        self.streams = 0
        self.release = threading.Event()
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=8),
            options=[("grpc.max_receive_message_length", 10 * 1024 * 1024)],
        )
        handler = grpc.stream_stream_rpc_method_handler(self._transfer)
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("grpc.Transfer", {"Transfer": handler}),)
        )
        credentials = grpc.ssl_server_credentials(
            [(certs.server_key.read_bytes(), certs.server_cert.read_bytes())],
            root_certificates=certs.ca.read_bytes(),
            require_client_auth=True,
        )
        self.port = self.server.add_secure_port("127.0.0.1:0", credentials)

    def _transfer(
        self, requests: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        self.streams += 1
        self.release.wait(60)
        return iter(())

    def __enter__(self) -> DeafServer:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.stop(0)


def test_a_server_that_stops_reading_is_left_for_a_new_stream(
    certs: CertFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(stream, "WRITE_TIMEOUT", 2.0)
    with DeafServer(certs) as server:
        config = Config(
            work_dir=str(tmp_path / "work"),
            tls=TlsConfig(ca=str(certs.ca), cert=str(certs.client_cert), key=str(certs.client_key)),
            # Uncompressed: the filler must take its size on the wire.
            transport=TransportConfig(compression="none", backoff_initial=0.2, backoff_max=0.5),
            regions={"default": RegionConfig(private=f"127.0.0.1:{server.port}")},
        )

        async def main() -> TransferLoop:
            buffer = RecordBuffer()
            filler = "x" * 100_000
            await buffer.put_many([encode_record(9999, 1, {"pad": filler})] * 300)  # 30 MB
            loop = TransferLoop(
                config, TlsMaterial.load(config.tls), buffer, lambda: b"", _ignore, lambda: None
            )
            task = asyncio.create_task(loop.run())
            deadline = time.monotonic() + 20
            try:
                while loop.state.stats.connects < 2 and time.monotonic() < deadline:
                    assert not task.done(), task
                    await asyncio.sleep(0.1)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            return loop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            loop = runner.run(main())
    assert loop.state.stats.connects >= 2, "the agent stayed on a stream the server never read"
    assert loop.state.stats.write_failures >= 1
    assert "not taken within 2 s (the server does not read the stream)" in caplog.text


async def _ignore(raw: bytes) -> None:
    pass
