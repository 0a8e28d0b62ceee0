"""One failing heartbeat build is logged and counted; the next one goes out (in-process Agent)."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
from conftest import AgentConfig

from elkeid_agent import app
from elkeid_agent._proto import grpc_pb2
from elkeid_agent.config import load_config
from elkeid_agent.transport.tls import TlsMaterial
from elkeid_agent.workers import IO_THREADS, use_fixed_pool


def test_a_failing_heartbeat_is_contained(
    agent_config: AgentConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(str(agent_config()), {})
    for sub in ("plugin", "log", "tmp"):
        (config.work_path / sub).mkdir(parents=True, exist_ok=True)
    real = app.hb.build_agent_heartbeat
    failures = iter([RuntimeError("psutil said no")])

    def flaky(**kw: object) -> dict[str, str]:
        for exc in failures:
            raise exc
        return real(**kw)  # type: ignore[arg-type]

    monkeypatch.setattr(app.hb, "build_agent_heartbeat", flaky)

    async def main() -> None:
        agent = app.Agent(config, TlsMaterial.load(config.tls), dict(os.environ))
        agent.send_heartbeat()  # raises inside: contained
        assert agent.health.counters["heartbeat_errors"] == 1
        assert agent.health.faulty("heartbeat")
        assert len(agent.buffer) == 0
        agent.send_heartbeat()
        assert not agent.health.faulty("heartbeat")
        batch = agent.buffer.take(8 << 20)
        beats = [grpc_pb2.Record.FromString(r) for r in batch.records]
        assert [b.data_type for b in beats] == [1000]
        fields = dict(beats[0].data.fields)
        # The beat after the failure still reports it (it was built before the fault cleared).
        assert fields["heartbeat_errors"] == "1"
        assert "heartbeat not sent" in fields["state_detail"]

    asyncio.run(main())


def test_host_facts_that_cannot_be_read_do_not_end_the_heartbeat_loop(
    agent_config: AgentConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The facts refresh (psutil.net_if_addrs needs a socket: EMFILE when the agent is out of
    # fds) ran outside the heartbeat's boundary: its exception ended the heartbeat task group,
    # and with it the agent. The beat goes out with the facts of the previous refresh.
    config = load_config(str(agent_config()), {})
    for sub in ("plugin", "log", "tmp"):
        (config.work_path / sub).mkdir(parents=True, exist_ok=True)

    def out_of_fds() -> object:
        raise OSError(24, "Too many open files")

    async def main() -> None:
        agent = app.Agent(config, TlsMaterial.load(config.tls), dict(os.environ))
        facts = agent.facts
        monkeypatch.setattr(app, "read_host_facts", out_of_fds)
        await agent._beat()
        assert agent.facts is facts
        assert agent.health.counters["host_facts_errors"] == 1
        batch = agent.buffer.take(8 << 20)
        beats = [grpc_pb2.Record.FromString(r) for r in batch.records]
        assert [b.data_type for b in beats] == [1000]
        fields = dict(beats[0].data.fields)
        assert "Too many open files" in fields["state_detail"]
        assert fields["kernel_version"] == facts.kernel_version

    asyncio.run(main())


def test_the_heartbeat_goes_out_while_every_worker_thread_is_held(
    agent_config: AgentConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pool behind to_thread is fixed (workers.py): six calls stuck on a hung filesystem
    # (status.json, the ring, the usage walk, the spool's write and read, a download) held the
    # beat in its wait for the host facts, and the watchdog tick behind it, for good.
    config = load_config(str(agent_config()), {})
    for sub in ("plugin", "log", "tmp"):
        (config.work_path / sub).mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(app, "FACTS_SECONDS", 0.2)
    monkeypatch.setattr(app, "BEAT_FILE_SECONDS", 0.2)
    hung = threading.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        use_fixed_pool(loop)
        agent = app.Agent(config, TlsMaterial.load(config.tls), dict(os.environ))
        facts = agent.facts
        held = [loop.run_in_executor(None, hung.wait) for _ in range(IO_THREADS)]
        try:
            async with asyncio.timeout(5):
                await agent._beat()
                await agent._beat()  # the read still pending is not queued a second time
        finally:
            hung.set()
            await asyncio.gather(*held)
        assert agent.facts is facts
        assert agent.health.faulty("host facts")
        batch = agent.buffer.take(8 << 20)
        beats = [grpc_pb2.Record.FromString(r) for r in batch.records]
        assert [b.data_type for b in beats] == [1000, 1000]
        await agent._beat()  # the threads are free again: the fault clears
        assert not agent.health.faulty("host facts")

    asyncio.run(main())
