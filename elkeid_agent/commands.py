"""Decode Commands from the server and route them (PROTOCOL.md section 3).

A Command carries a Task or the complete set of Configs. Tasks for `elkeid-agent` are the agent's
own (1050 upload, 1051 metadata, 1060 shutdown); any other object_name goes to that plugin.
Configs go to the plugin sync and, for the `elkeid-agent` entry, to the self-upgrade.
Every failure a task can have ends as a 5100 record carrying the task's token; the stream stays up.

Containment. The unit of failure is one command, one task, one config set, one config entry:
`handle` and `run_configs` catch every exception at those boundaries (and only there), log it,
count it and record a Health fault, so no input from the server can end the agent. Validation
happens here, at the edge, before anything acts: a refused Config entry is skipped (naming the
field), the rest of its set is applied, and a plugin whose entry was refused keeps running as
it is.

An empty Command (no Task, no Configs) is the empty desired set, as in the Go agent: the
Elkeid server sends it when an operator removes a host's last plugin. (Protobuf cannot tell
an empty Configs list from an absent one, so a Command with a Task and no Configs is only the
Task.)
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Annotated, Protocol, TypeVar
from urllib.parse import urlsplit

import msgspec
from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError

from elkeid_agent._proto import grpc_pb2
from elkeid_agent.errors import TaskFailed
from elkeid_agent.health import Health
from elkeid_agent.version import PRODUCT
from elkeid_agent.wire import encode_record

log = logging.getLogger(__name__)

TASK_RESULT = 5100
UPLOAD_FILE = 1050
SET_METADATA = 1051
SHUTDOWN = 1060

#: Plugin (and agent) names: they become a directory and an executable name.
NAME_RE = re.compile(r"[0-9A-Za-z_-]{1,64}")
SHA256_RE = re.compile(r"[0-9A-Fa-f]{64}")
#: Versions, types: printable ASCII without spaces, bounded (they go into logs and heartbeats).
TOKEN_RE = re.compile(r"[\x21-\x7e]{1,128}")
#: At most this many plugins are applied from one Configs set (an Elkeid host runs about ten);
#: the entries beyond are refused and counted, so a set of thousands cannot flood the host.
MAX_PLUGINS = 64
#: A Configs set with more entries than this is refused whole, before each entry is decoded
#: and validated on the event loop (a 10 MiB set holds ~130,000).
MAX_CONFIG_ENTRIES = 1024
MAX_URLS = 16
MAX_URL_LENGTH = 4096
#: `detail` becomes the plugin's DETAIL environment variable; Linux refuses a single
#: environment string over 128 KiB (MAX_ARG_STRLEN), so half of that.
MAX_DETAIL = 64 * 1024
#: 1050 buf_size: the Go agent sends chunks of buf_size bytes and the server takes messages up
#: to 10 MiB, so a larger value never worked with the Go agent either; 0 or less is no chunk.
MAX_BUF_SIZE = 10 * 1024 * 1024
#: Linux PATH_MAX.
MAX_PATH = 4096
#: 1051 idc and region end up in `specified_env`, an EnvironmentFile of the service unit:
#: a strict charset keeps a CR, LF or quote from adding a line (an LD_PRELOAD) to it.
METADATA_PATTERN = r"\A[A-Za-z0-9._-]{1,64}\Z"
#: How many refused entries are logged one by one per set; the rest are summed up.
LOGGED_REFUSALS = 10


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

    path: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_PATH)]
    buf_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_BUF_SIZE)]

    def __post_init__(self) -> None:
        # msgspec reports a ValueError raised here as a ValidationError naming the struct.
        if "\x00" in self.path:
            raise ValueError("path contains a NUL byte - at `$.path`")
        if not self.path.startswith("/"):
            raise ValueError("path must be absolute - at `$.path`")


MetadataValue = Annotated[str, msgspec.Meta(pattern=METADATA_PATTERN)]


class MetadataRequest(msgspec.Struct, forbid_unknown_fields=False):
    """1051 data."""

    idc: MetadataValue | None = None
    region: MetadataValue | None = None


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

    async def sync(self, configs: Sequence[ConfigSpec], hold: Collection[str] = ()) -> None:
        """Make the running plugins equal the desired set; leave the plugins in `hold`
        (their entries were refused) exactly as they are. A call made while an earlier one
        is still waiting supersedes it: the earlier one returns early."""
        ...


class Upgrader(Protocol):
    async def consider(self, config: ConfigSpec) -> None:
        """Upgrade the agent itself if the entry names another version."""
        ...

    async def withdraw(self) -> None:
        """The newest set has no entry for the agent: no upgrade is wanted any more."""
        ...


def task_result(token: str, ok: bool, msg: str) -> bytes:
    """The 5100 record reporting a task's outcome."""
    fields = {"token": token, "msg": msg, "status": "succeed" if ok else "failed"}
    return encode_record(TASK_RESULT, int(time.time()), fields)


#: Wire types of Command's fields as the server encodes them (1 is its AgentCtrl, an int32 we do
#: not use). A field of another type makes the Go agent's decoder fail the whole Command; upb
#: keeps it as an unknown field instead, and the Command would read as empty: the empty desired
#: set, which stops every plugin. So such a Command is refused, as the Go agent refuses it.
_COMMAND_WIRE_TYPES = {1: 0, 2: 2, 3: 2}


#: Unknown fields a Command may carry (a newer server's additions are a few bytes). Checking
#: their wire types makes a Python object of each: 10 MiB of them held the loop 7 s, 500 MB.
MAX_UNKNOWN_BYTES = 64 * 1024


def decode_command(raw: bytes) -> grpc_pb2.Command:
    try:
        command = grpc_pb2.Command.FromString(raw)
        known = grpc_pb2.Command.FromString(raw)
    except DecodeError as exc:
        raise TaskFailed(f"undecodable command: {exc}") from exc
    known.DiscardUnknownFields()
    extra = command.ByteSize() - known.ByteSize()
    if not extra:
        return command
    if extra > MAX_UNKNOWN_BYTES:
        raise TaskFailed(
            f"undecodable command: {extra} bytes of unknown fields (at most {MAX_UNKNOWN_BYTES})"
        )
    found = unknown_fields.UnknownFieldSet(command)
    for unknown in (found[i] for i in range(len(found))):
        expected = _COMMAND_WIRE_TYPES.get(unknown.field_number)
        if expected is not None and unknown.wire_type != expected:
            raise TaskFailed(
                f"undecodable command: field {unknown.field_number} "
                f"has wire type {unknown.wire_type}"
            )
    return command


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


def _url_problem(url: str) -> str | None:
    if len(url) > MAX_URL_LENGTH:
        return f"longer than {MAX_URL_LENGTH} characters"
    if any(c <= " " or c == "\x7f" for c in url):
        return "contains a control character or whitespace"
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError when out of range or not a number
    except ValueError as exc:
        return f"does not parse ({exc})"
    if parts.scheme not in ("http", "https"):
        return f"scheme {parts.scheme!r} is not http or https"
    if not parts.hostname:
        return "has no host"
    if port == 0:
        return "port 0"
    return None


def config_problem(spec: ConfigSpec) -> str | None:
    """Pure: why this Config entry must not be acted on (naming the field), or None."""
    if not NAME_RE.fullmatch(spec.name):
        return f"name {spec.name[:80]!r} must match {NAME_RE.pattern}"
    if not TOKEN_RE.fullmatch(spec.version):
        return f"version {spec.version[:80]!r} must be 1-128 printable characters"
    if spec.type and not TOKEN_RE.fullmatch(spec.type):
        return f"type {spec.type[:80]!r} must be printable characters"
    if not SHA256_RE.fullmatch(spec.sha256):
        return "sha256 must be 64 hex digits"
    if spec.signature and not SHA256_RE.fullmatch(spec.signature):
        return "signature must be empty or 64 hex digits"
    if len(spec.download_urls) > MAX_URLS:
        return f"download_urls: {len(spec.download_urls)} URLs, at most {MAX_URLS}"
    for i, url in enumerate(spec.download_urls):
        problem = _url_problem(url)
        if problem is not None:
            return f"download_urls[{i}] {url[:80]!r} {problem}"
    if "\x00" in spec.detail:
        return "detail contains a NUL byte"
    if len(spec.detail) > MAX_DETAIL:
        return f"detail is longer than {MAX_DETAIL} characters"
    return None


class ConfigCheck(msgspec.Struct, frozen=True):
    """A Configs set split at the edge: what may be applied, and what was refused why."""

    upgrade: tuple[ConfigSpec, ...]
    plugins: tuple[ConfigSpec, ...]
    refused: tuple[tuple[str, str], ...]  # (name, reason)
    over_limit: int
    #: Names of refused entries that may be plugins on this host: they are left as they are.
    hold: frozenset[str]


def check_configs(configs: Sequence[ConfigSpec], max_plugins: int = MAX_PLUGINS) -> ConfigCheck:
    """Pure: validate every entry, cap the number of plugins applied."""
    upgrade: list[ConfigSpec] = []
    plugins: list[ConfigSpec] = []
    refused: list[tuple[str, str]] = []
    hold: set[str] = set()
    over_limit = 0
    for spec in configs:
        problem = config_problem(spec)
        if problem is None and spec.name != PRODUCT and len(plugins) >= max_plugins:
            over_limit += 1
            problem = f"over the limit of {max_plugins} plugins per set"
        if problem is not None:
            refused.append((spec.name[:80], problem))
            if NAME_RE.fullmatch(spec.name):
                hold.add(spec.name)
        elif spec.name == PRODUCT:
            upgrade.append(spec)
        else:
            plugins.append(spec)
    return ConfigCheck(tuple(upgrade), tuple(plugins), tuple(refused), over_limit, frozenset(hold))


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
        health: Health | None = None,
    ) -> None:
        self.agent = agent
        self.plugins = plugins
        self.upgrader = upgrader
        self.emit = emit
        self.health = Health() if health is None else health
        self.failures = 0
        self._configs: list[ConfigSpec] | None = None
        self._configs_ready = asyncio.Event()
        #: Counts the sets handed on: the newest is the one in effect.
        self._generation = 0
        #: The newest set's application (tests wait for it), and the one before it.
        self.applying: asyncio.Task[None] | None = None
        self._before_newest: asyncio.Task[None] | None = None
        #: The plugin set applied last by a previous process, started before any server set.
        self.offline_configs: Sequence[ConfigSpec] = ()
        #: Called with each plugin set once applied (persisted for the next start).
        self.on_applied: Callable[[Sequence[ConfigSpec]], Awaitable[None]] | None = None

    async def handle(self, raw: bytes) -> None:
        """Handle one Command; nothing it contains can raise out of here."""
        try:
            command = decode_command(raw)
        except TaskFailed as exc:
            self.failures += 1
            log.error("%s", exc)
            return
        try:
            if command.HasField("task"):
                t = command.task
                await self.handle_task(TaskSpec(t.data_type, t.object_name, t.data, t.token))
            if len(command.configs) > MAX_CONFIG_ENTRIES:
                # Refused before each entry becomes an object: the plugins stay as they are.
                self.health.fault(
                    "configs",
                    f"config set of {len(command.configs)} entries refused "
                    f"(at most {MAX_CONFIG_ENTRIES})",
                    "config_sets_refused",
                )
            elif command.configs or not command.HasField("task"):
                await self.handle_configs(config_specs(command))
        except Exception as exc:  # the boundary of one command
            self.failures += 1
            log.exception("command not handled")
            self.health.fault("commands", f"command not handled: {exc!r}", "command_errors")
        else:
            self.health.clear("commands")

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
        except Exception as exc:  # the boundary of one task: a defect, not bad input
            self.failures += 1
            log.exception("task %s for %s failed", task.data_type, task.object_name)
            self.health.fault("tasks", f"task {task.data_type}: {exc!r}", "task_errors")
            self.emit(task_result(task.token, False, f"internal error: {exc!r}"))
            return
        self.health.clear("tasks")
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
        """Hand the set to `run_configs`; a newer set replaces one not yet taken."""
        self._configs = configs
        self._configs_ready.set()

    async def run_configs(self) -> None:
        """Apply each Config set as it comes, in a task of its own, so neither a long plugin
        download nor the set before holds it up: the newer set supersedes the older one
        (the supervisor keeps the installs of entries it leaves unchanged going)."""
        async with asyncio.TaskGroup() as tg:
            if self.offline_configs and self._configs is None:
                # Read from the disk: validated like any set, and plugins only.
                offline = [c for c in self.offline_configs if c.name != PRODUCT]
                self._start(tg, offline, offline=True)
            while True:
                await self._configs_ready.wait()
                # The set before the newest is superseded and ends soon (once past the
                # supervisor's lock): waiting for it keeps at most two sets in their tasks and
                # one waiting here, however fast a server sends them.
                before = self._before_newest
                if before is not None and not before.done():
                    await asyncio.wait([before])
                self._configs_ready.clear()
                configs, self._configs = self._configs, None
                if configs is not None:
                    self._start(tg, configs, offline=False)

    def _start(self, tg: asyncio.TaskGroup, configs: list[ConfigSpec], *, offline: bool) -> None:
        self._before_newest = self.applying
        self._generation += 1
        self.applying = tg.create_task(self._apply(configs, self._generation, offline),
                                       name=f"configs-{self._generation}")

    async def _apply(self, configs: list[ConfigSpec], generation: int, offline: bool) -> None:
        try:
            if offline:
                check = check_configs(configs)
                self._report_refused(check)
                if self._newest(generation):
                    await self.plugins.sync(check.plugins, check.hold)
            else:
                await self.apply_configs(configs, generation)
        except Exception as exc:  # the boundary of one config set
            what = "last plugin set not started" if offline else "config set not applied"
            log.exception("%s", what)
            self.health.fault("configs", f"{what}: {exc!r}", "config_errors")
        else:
            if self._newest(generation):
                self.health.clear("configs")

    async def apply_configs(self, configs: Sequence[ConfigSpec], generation: int = 0) -> None:
        """Validate the set, then hand each part on; one entry's failure stops no other.
        The set is saved for the next start only if no newer one came meanwhile."""
        check = check_configs(configs)
        self._report_refused(check)
        for config in check.upgrade or (None,):
            if not self._newest(generation):
                return
            try:
                if config is None:
                    await self.upgrader.withdraw()
                else:
                    await self.upgrader.consider(config)
            except Exception as exc:  # the boundary of one config entry
                log.exception("self-upgrade entry not applied")
                self.health.fault("upgrade config", repr(exc), "config_errors")
            else:
                self.health.clear("upgrade config")
        # Checked with no await before the call: the supervisor sees the sets in order.
        if not self._newest(generation):
            return
        await self.plugins.sync(check.plugins, check.hold)
        if self.on_applied is not None and self._newest(generation):
            await self.on_applied(check.plugins)

    def _newest(self, generation: int) -> bool:
        """Whether no set came after this one (0: a direct call, outside run_configs)."""
        return generation in (0, self._generation)

    def _report_refused(self, check: ConfigCheck) -> None:
        if not check.refused:
            self.health.clear("config entries")
            return
        for name, reason in check.refused[:LOGGED_REFUSALS]:
            log.error("config entry %r refused: %s", name, reason)
        more = len(check.refused) - LOGGED_REFUSALS
        if more > 0:
            log.error("%d more config entries refused", more)
        self.health.count("config_entries_refused", len(check.refused))
        if check.over_limit:
            self.health.count("config_entries_over_limit", check.over_limit)
        # Every refused entry named (shortened), then why the first was: state_detail is short.
        names = [repr(name if len(name) <= 20 else name[:17] + "...") for name, _ in check.refused]
        listed = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        first = check.refused[0][1]
        self.health.fault("config entries", f"{len(names)} refused: {listed} ({first})")
