"""Decode Commands from the server and route them (PROTOCOL.md section 3).

A Command carries a Task or the complete set of Configs. Tasks for `elkeid-agent` are the agent's
own (1050 upload, 1051 metadata, 1060 shutdown); any other object_name goes to that plugin.
Configs go to the plugin sync and, for the `elkeid-agent` entry, to the self-upgrade.
Every failure a task can have ends as a 5100 record carrying the task's token; the stream stays up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

import msgspec
from google.protobuf.message import DecodeError

from elkeid_agent._proto import grpc_pb2
from elkeid_agent.errors import TaskFailed
from elkeid_agent.version import PRODUCT
from elkeid_agent.wire import encode_record

log = logging.getLogger(__name__)

TASK_RESULT = 5100
UPLOAD_FILE = 1050
SET_METADATA = 1051
SHUTDOWN = 1060


class ConfigSpec(msgspec.Struct, frozen=True):
    """One entry of a Configs command, validated and detached from protobuf."""

    name: str
    type: str = ""
    version: str = ""
    sha256: str = ""
    signature: str = ""
    download_urls: tuple[str, ...] = ()
    detail: str = ""


class TaskSpec(msgspec.Struct, frozen=True):
    data_type: int
    object_name: str
    data: str
    token: str


class UploadRequest(msgspec.Struct, forbid_unknown_fields=False):
    """1050 data. Unknown keys are tolerated: newer servers may add some."""

    path: str
    buf_size: int


class MetadataRequest(msgspec.Struct, forbid_unknown_fields=False):
    """1051 data."""

    idc: str | None = None
    region: str | None = None


class AgentTasks(Protocol):
    """The agent's own task handlers; each raises TaskFailed with a reason on failure."""

    async def upload(self, token: str, request: UploadRequest) -> None: ...

    async def set_metadata(self, request: MetadataRequest) -> None: ...

    async def shutdown(self) -> None: ...


class PluginHost(Protocol):
    """The plugin supervisor as the dispatcher sees it."""

    async def send_task(self, task: TaskSpec) -> None:
        """Queue a task for a plugin; raise TaskFailed (unknown plugin, full queue, dead)."""
        ...

    async def sync(self, configs: Sequence[ConfigSpec]) -> None:
        """Make the running plugins equal the desired set."""
        ...


class Upgrader(Protocol):
    async def consider(self, config: ConfigSpec) -> None:
        """Upgrade the agent itself if the entry names another version."""
        ...


class NoPlugins:
    """The PluginHost of an agent without plugin support: every plugin task fails."""

    async def send_task(self, task: TaskSpec) -> None:
        raise TaskFailed(f"no such plugin: {task.object_name}")

    async def sync(self, configs: Sequence[ConfigSpec]) -> None:
        if configs:
            log.warning("plugin configs ignored: %s", ", ".join(c.name for c in configs))


class NoUpgrade:
    async def consider(self, config: ConfigSpec) -> None:
        log.warning("self-upgrade to %s is not supported by this build", config.version)


def task_result(token: str, ok: bool, msg: str) -> bytes:
    """The 5100 record reporting a task's outcome."""
    fields = {"token": token, "msg": msg, "status": "succeed" if ok else "failed"}
    return encode_record(TASK_RESULT, int(time.time()), fields)


def decode_command(raw: bytes) -> grpc_pb2.Command:
    try:
        return grpc_pb2.Command.FromString(raw)
    except DecodeError as exc:
        raise TaskFailed(f"undecodable command: {exc}") from exc


def config_specs(command: grpc_pb2.Command) -> list[ConfigSpec]:
    return [
        ConfigSpec(
            name=c.name,
            type=c.type,
            version=c.version,
            sha256=c.sha256,
            signature=c.signature,
            download_urls=tuple(c.download_urls),
            detail=c.detail,
        )
        for c in command.configs
    ]


T = TypeVar("T")


def parse_json(data: str, kind: type[T], what: str) -> T:
    """Decode task JSON into a Struct; the error names the field."""
    try:
        return msgspec.json.decode(data.encode(), type=kind)
    except msgspec.ValidationError as exc:
        raise TaskFailed(f"invalid {what} task data: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise TaskFailed(f"invalid {what} task data: not JSON ({exc})") from exc


class Dispatcher:
    """Routes decoded Commands; `emit` queues a record (the 5100 results) for the server."""

    def __init__(
        self,
        agent: AgentTasks,
        plugins: PluginHost,
        upgrader: Upgrader,
        emit: Callable[[bytes], None],
    ) -> None:
        self.agent = agent
        self.plugins = plugins
        self.upgrader = upgrader
        self.emit = emit
        self.commands = 0
        self.failures = 0
        self._configs: list[ConfigSpec] | None = None
        self._configs_ready = asyncio.Event()
        #: The plugin set applied last by a previous process, started before any server set.
        self.offline_configs: Sequence[ConfigSpec] = ()
        #: Called with each plugin set once applied (persisted for the next start).
        self.on_applied: Callable[[Sequence[ConfigSpec]], Awaitable[None]] | None = None

    async def handle(self, raw: bytes) -> None:
        self.commands += 1
        try:
            command = decode_command(raw)
        except TaskFailed as exc:
            self.failures += 1
            log.error("%s", exc)
            return
        if command.HasField("task"):
            t = command.task
            await self.handle_task(TaskSpec(t.data_type, t.object_name, t.data, t.token))
        if command.configs:
            await self.handle_configs(config_specs(command))

    async def handle_task(self, task: TaskSpec) -> None:
        try:
            if task.object_name == PRODUCT:
                done = await self._agent_task(task)
            else:
                await self.plugins.send_task(task)
                done = None
        except TaskFailed as exc:
            self.failures += 1
            log.warning("task %s for %s failed: %s", task.data_type, task.object_name, exc)
            self.emit(task_result(task.token, False, str(exc)))
            return
        if done is not None:
            self.emit(task_result(task.token, True, done))

    async def _agent_task(self, task: TaskSpec) -> str | None:
        if task.data_type == UPLOAD_FILE:
            await self.agent.upload(task.token, parse_json(task.data, UploadRequest, "upload"))
            return None  # the upload reports its own outcome when it ends
        if task.data_type == SET_METADATA:
            await self.agent.set_metadata(parse_json(task.data, MetadataRequest, "metadata"))
            return "metadata updated"
        if task.data_type == SHUTDOWN:
            await self.agent.shutdown()
            return "shutting down"
        raise TaskFailed(f"unknown data_type {task.data_type} for {PRODUCT}")

    async def handle_configs(self, configs: list[ConfigSpec]) -> None:
        """Hand the set to `run_configs`; a newer set replaces one not yet applied."""
        self._configs = configs
        self._configs_ready.set()

    async def run_configs(self) -> None:
        """Apply Configs one set at a time, so a long plugin download never blocks tasks."""
        if self.offline_configs and self._configs is None:
            await self.plugins.sync(self.offline_configs)
        while True:
            await self._configs_ready.wait()
            self._configs_ready.clear()
            configs, self._configs = self._configs, None
            if configs is None:
                continue
            for config in configs:
                if config.name == PRODUCT:
                    await self.upgrader.consider(config)
            plugins = [c for c in configs if c.name != PRODUCT]
            await self.plugins.sync(plugins)
            if self.on_applied is not None:
                await self.on_applied(plugins)
