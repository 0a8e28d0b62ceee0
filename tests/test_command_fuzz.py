"""Random and mutated Command bytes against the Dispatcher and a real PluginSupervisor.

Seeds are real encoded Commands (tasks for the agent and for a plugin, Config sets with the
installed plugin and the agent itself); hypothesis truncates them, flips bytes, changes wire
types, plants huge lengths and invalid UTF-8, and builds Commands whose task JSON and Config
fields have random values and types. Whatever arrives: nothing escapes `Dispatcher.handle`,
`run_configs` and the supervisor keep running, and the plugin state stays consistent.

The supervisor is real (real directories, real plugin processes, real HTTP attempts); the loop
only refuses connections off loopback, so a fuzzed URL cannot reach the network.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elkeid_agent._proto import grpc_pb2
from elkeid_agent.buffer import RecordBuffer
from elkeid_agent.commands import (
    MAX_PLUGINS,
    SET_METADATA,
    SHUTDOWN,
    UPLOAD_FILE,
    ConfigSpec,
    Dispatcher,
    MetadataRequest,
    UploadRequest,
)
from elkeid_agent.config import PluginsConfig
from elkeid_agent.errors import TaskFailed
from elkeid_agent.plugins.lifecycle import State
from elkeid_agent.plugins.supervisor import PluginSupervisor
from elkeid_agent.version import PRODUCT

PLUGIN = b"#!/bin/sh\nexec cat <&3 >/dev/null\n"
SHA = hashlib.sha256(PLUGIN).hexdigest()
NAME = re.compile(r"[0-9A-Za-z_-]{1,64}")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class GuardedLoop(asyncio.SelectorEventLoop):
    """The standard loop, refusing every connection that would leave loopback."""

    async def create_connection(self, protocol_factory: Any, host: Any = None, *a: Any,
                                **kw: Any) -> Any:
        if host not in LOOPBACK:
            raise OSError(f"test guard: no network beyond loopback ({host!r})")
        return await super().create_connection(protocol_factory, host, *a, **kw)


class AgentTasks:
    """The agent's own tasks with the real edge checks (the uploader has no server)."""

    def __init__(self) -> None:
        self.metadata: list[MetadataRequest] = []
        self.shutdowns = 0

    async def upload(self, token: str, request: UploadRequest) -> None:
        assert request.path.startswith("/")
        assert "\x00" not in request.path
        raise TaskFailed("not connected to the server")

    async def set_metadata(self, request: MetadataRequest) -> None:
        for value in (request.idc, request.region):
            assert value is None or re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value)
        self.metadata.append(request)

    async def shutdown(self) -> None:
        self.shutdowns += 1


def _config(name: str, url: str = "http://127.0.0.1:9/p", **kw: Any) -> grpc_pb2.Config:
    return grpc_pb2.Config(
        name=name, version=kw.pop("version", "1"), sha256=kw.pop("sha256", SHA),
        download_urls=[url], **kw,
    )


def _task(data_type: int, data: Any, object_name: str = PRODUCT) -> grpc_pb2.Task:
    text = data if isinstance(data, str) else json.dumps(data)
    return grpc_pb2.Task(data_type=data_type, object_name=object_name, data=text, token="tk")


SEEDS = [
    grpc_pb2.Command(configs=[_config("fz"), _config("other", detail="A=1")]),
    grpc_pb2.Command(configs=[_config("fz"), _config(PRODUCT, version="9.9")]),
    grpc_pb2.Command(task=_task(UPLOAD_FILE, {"path": "/etc/hostname", "buf_size": 1024})),
    grpc_pb2.Command(task=_task(SET_METADATA, {"idc": "dc-1", "region": "eu"})),
    grpc_pb2.Command(task=_task(7, "{}", object_name="fz")),
    grpc_pb2.Command(task=_task(SHUTDOWN, ""), configs=[_config("fz")]),
    grpc_pb2.Command(),
]
SEED_BYTES = [c.SerializeToString() for c in SEEDS]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEED_BYTES)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "flip", "wiretype", "huge", "utf8", "insert"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "truncate":
            del data[at:]
        elif kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "wiretype" and data:
            data[at] = (data[at] & ~0x07) | draw(st.integers(0, 7))
        elif kind == "huge":
            data[at:at] = b"\xff\xff\xff\xff\x0f"
        elif kind == "utf8":
            data[at:at] = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"]))
        else:
            data[at:at] = draw(st.binary(max_size=8))
    return bytes(data)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=6,
)
FIELD = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["fz", "other", PRODUCT, "a/b", "x\n", "n" * 65, "", "x\rLD_PRELOAD=1"]),
)
URL = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["http://127.0.0.1:99999/p", "http://[::1/p", "http://127.0.0.1:9/x",
                     "ftp://127.0.0.1/x", "http://127.0.0.1:9/\x00"]),
)


@st.composite
def structured(draw: st.DrawFn) -> bytes:
    command = grpc_pb2.Command()
    if draw(st.booleans()):
        data_type = draw(st.sampled_from([UPLOAD_FILE, SET_METADATA, SHUTDOWN, 0, 7, -1]))
        keys = st.sampled_from(["path", "buf_size", "idc", "region", "x"])
        data = draw(st.one_of(st.dictionaries(keys, JSON, max_size=4), JSON, st.text()))
        target = draw(st.sampled_from([PRODUCT, "fz", ""]))
        command.task.CopyFrom(_task(data_type, data, target))
    for _ in range(draw(st.integers(0, 5))):
        command.configs.append(grpc_pb2.Config(
            name=draw(FIELD), type=draw(st.sampled_from(["", "tar.gz", "\x00"])),
            version=draw(FIELD), sha256=draw(st.sampled_from([SHA, "", "ab", "zz" * 32])),
            signature=draw(st.sampled_from(["", SHA, "x"])),
            download_urls=draw(st.lists(URL, max_size=3)), detail=draw(FIELD),
        ))
    return command.SerializeToString()


COMMANDS = st.one_of(mutated(), structured(), st.binary(max_size=64))


class Rig:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.buffer = RecordBuffer(max_bytes=16 << 20)
        self.sup = PluginSupervisor(work, self.buffer, PluginsConfig())
        self.sup.download_timeout = 2.0
        self.emitted: list[bytes] = []
        self.agent = AgentTasks()
        self.dispatcher = Dispatcher(
            self.agent, self.sup, _NoUpgrade(), self.emitted.append, health=self.sup.health
        )
        self.install()

    def install(self) -> None:
        directory = self.work / "plugin" / "fz"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "fz").write_bytes(PLUGIN)
        (directory / "fz").chmod(0o755)

    async def feed(self, raw: bytes) -> None:
        await self.dispatcher.handle(raw)
        d = self.dispatcher
        while d._configs_ready.is_set() or d._configs is not None:  # noqa: ASYNC110 - private
            await asyncio.sleep(0.005)
        # The newest set's application ends once its installs have (older ones are
        # superseded and end before it).
        if d.applying is not None:
            await asyncio.wait([d.applying])

    def check(self) -> None:
        root = self.work / "plugin"
        assert len(self.sup._slots) <= MAX_PLUGINS
        for name, slot in self.sup._slots.items():
            assert NAME.fullmatch(name)
            assert slot.directory == root / name
            assert slot.lifecycle.state is not State.STOPPED
        for entry in root.iterdir():
            assert entry.name == ".pgids" or NAME.fullmatch(entry.name), entry.name
        for raw in self.emitted:
            record = grpc_pb2.Record.FromString(raw)
            assert record.data_type == 5100
            assert record.data.fields["status"] in ("succeed", "failed")
        self.emitted.clear()
        for line in self.sup.health.details() + self.sup.errors():
            assert isinstance(line, str)
        assert not list(self.work.parent.glob("escape*"))


def test_no_command_bytes_escape_the_dispatcher(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "work")
    tasks: list[asyncio.Task[None]] = []

    async def start() -> None:
        tasks.append(asyncio.create_task(rig.dispatcher.run_configs()))
        tasks.append(asyncio.create_task(rig.sup.run()))

    async def finish() -> None:
        # After all that, the empty set removes everything ...
        await rig.feed(b"")
        assert rig.sup._slots == {}
        assert {p.name for p in (tmp_path / "work/plugin").iterdir()} <= {".pgids"}
        # ... a clean set still works: the installed plugin runs ...
        rig.install()
        await rig.feed(grpc_pb2.Command(configs=[_config("fz")]).SerializeToString())
        for _ in range(500):
            info = rig.sup.slot_info("fz")
            if info is not None and info[0] is State.RUNNING:
                break
            await asyncio.sleep(0.02)
        info = rig.sup.slot_info("fz")
        assert info is not None
        assert info[0] is State.RUNNING
        # ... and the empty set stops and removes it again.
        await rig.feed(b"")
        assert rig.sup._slots == {}
        assert {p.name for p in (tmp_path / "work/plugin").iterdir()} <= {".pgids"}
        await rig.sup.stop()
        await tasks[1]

    # Tasks created in one `runner.run` go on in the next: the supervisor and run_configs live
    # across the examples, as in the agent, and each example is one Command on that loop.
    with asyncio.Runner(loop_factory=GuardedLoop) as runner:
        runner.run(start())

        @settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")), deadline=None,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(COMMANDS)
        def one(raw: bytes) -> None:
            runner.run(rig.feed(raw))
            for task in tasks:
                assert not task.done(), task
            rig.check()

        one()
        runner.run(finish())


class _NoUpgrade:
    async def consider(self, config: ConfigSpec) -> None:
        pass

    async def withdraw(self) -> None:
        pass
