"""Command dispatch: task routing, 5100 results naming the problem, Configs latest-wins.

The handlers are small in-test classes implementing the Protocols of elkeid_agent.commands;
Commands are real protobuf bytes as the server sends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

import pytest

from elkeid_agent._proto import grpc_pb2
from elkeid_agent.commands import (
    MAX_PLUGINS,
    SET_METADATA,
    SHUTDOWN,
    TASK_RESULT,
    UPLOAD_FILE,
    ConfigSpec,
    Dispatcher,
    MetadataRequest,
    TaskFailed,
    TaskSpec,
    UploadRequest,
    task_result,
)
from elkeid_agent.version import PRODUCT


class Agent:
    """AgentTasks that records what it was asked; `fail` makes every task fail."""

    def __init__(self, fail: str = "") -> None:
        self.fail = fail
        self.uploads: list[tuple[str, UploadRequest]] = []
        self.metadata: list[MetadataRequest] = []
        self.shutdowns = 0

    def _check(self) -> None:
        if self.fail:
            raise TaskFailed(self.fail)

    async def upload(self, token: str, request: UploadRequest) -> None:
        self._check()
        self.uploads.append((token, request))

    async def set_metadata(self, request: MetadataRequest) -> None:
        self._check()
        self.metadata.append(request)

    async def shutdown(self) -> None:
        self._check()
        self.shutdowns += 1


class Plugins:
    """A PluginHost with a fixed set of plugin names; `sync` can be held open."""

    def __init__(self, names: Sequence[str] = ()) -> None:
        self.names = set(names)
        self.tasks: list[TaskSpec] = []
        self.syncs: list[list[ConfigSpec]] = []
        self.holds: list[set[str]] = []
        self.gate: asyncio.Event | None = None

    async def send_task(self, task: TaskSpec) -> None:
        if task.object_name not in self.names:
            raise TaskFailed(f"no such plugin: {task.object_name}")
        self.tasks.append(task)

    async def sync(self, configs: Sequence[ConfigSpec], hold: Collection[str] = ()) -> None:
        self.syncs.append(list(configs))
        self.holds.append(set(hold))
        if self.gate is not None:
            await self.gate.wait()


class Upgrader:
    def __init__(self) -> None:
        self.considered: list[ConfigSpec] = []
        self.withdrawn = 0

    async def consider(self, config: ConfigSpec) -> None:
        self.considered.append(config)

    async def withdraw(self) -> None:
        self.withdrawn += 1


class Harness:
    def __init__(self, agent: Agent | None = None, plugins: Any = None) -> None:
        self.agent = agent or Agent()
        self.plugins = Plugins() if plugins is None else plugins
        self.upgrader = Upgrader()
        self.emitted: list[bytes] = []
        self.dispatcher = Dispatcher(self.agent, self.plugins, self.upgrader, self.emitted.append)

    def results(self) -> list[dict[str, str]]:
        out = []
        for raw in self.emitted:
            record = grpc_pb2.Record.FromString(raw)
            assert record.data_type == TASK_RESULT == 5100
            assert record.timestamp > 1_700_000_000
            out.append(dict(record.data.fields))
        return out


def task(data_type: int, data: str = "", token: str = "tok", object_name: str = PRODUCT) -> bytes:
    return grpc_pb2.Command(
        task=grpc_pb2.Task(data_type=data_type, object_name=object_name, data=data, token=token)
    ).SerializeToString()


def run(harness: Harness, *commands: bytes) -> Harness:
    async def main() -> None:
        for raw in commands:
            await harness.dispatcher.handle(raw)

    asyncio.run(main())
    return harness


# --- tasks ------------------------------------------------------------------------------------

GARBAGE = {
    "upload, not JSON": (UPLOAD_FILE, "{path: /etc/passwd", "not JSON"),
    "upload, empty data": (UPLOAD_FILE, "", "not JSON"),
    "upload, path missing": (UPLOAD_FILE, '{"buf_size": 1024}', "path"),
    "upload, buf_size missing": (UPLOAD_FILE, '{"path": "/etc/hosts"}', "buf_size"),
    "upload, buf_size a string": (UPLOAD_FILE, '{"path": "/x", "buf_size": "1k"}', "buf_size"),
    "upload, path a number": (UPLOAD_FILE, '{"path": 7, "buf_size": 1}', "path"),
    "upload, a list": (UPLOAD_FILE, "[1, 2]", "upload"),
    "metadata, not JSON": (SET_METADATA, "idc=x", "not JSON"),
    "metadata, idc a number": (SET_METADATA, '{"idc": 5}', "idc"),
    "metadata, region a list": (SET_METADATA, '{"region": ["a"]}', "region"),
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_garbage_task_json_fails_naming_the_field(case: str) -> None:
    data_type, data, needle = GARBAGE[case]
    h = run(Harness(), task(data_type, data, token=f"t-{case}"))
    (result,) = h.results()
    assert result["status"] == "failed"
    assert result["token"] == f"t-{case}"
    assert needle in result["msg"]
    assert h.agent.uploads == []
    assert h.agent.metadata == []
    assert h.dispatcher.failures == 1


def test_unknown_data_type_fails() -> None:
    h = run(Harness(), task(1099, "{}", token="t9"))
    assert h.results() == [
        {"token": "t9", "msg": f"unknown data_type 1099 for {PRODUCT}", "status": "failed"}
    ]


def test_data_type_zero_fails() -> None:
    h = run(Harness(), task(0, token="t0"))
    (result,) = h.results()
    assert result["status"] == "failed"
    assert "data_type 0" in result["msg"]


def test_plugin_task_is_forwarded_untouched() -> None:
    h = run(Harness(plugins=Plugins(["anchor"])), task(1234, '{"k":"v"}', "tok-1", "anchor"))
    assert h.plugins.tasks == [TaskSpec(1234, "anchor", '{"k":"v"}', "tok-1")]
    assert h.emitted == []  # the plugin answers for itself


def test_unknown_plugin_with_a_plugin_host() -> None:
    h = run(Harness(plugins=Plugins(["anchor"])), task(1, "", "tq", "no-such-plugin"))
    assert h.results()[0]["msg"] == "no such plugin: no-such-plugin"


def test_upload_goes_to_the_agent_and_reports_later() -> None:
    data = '{"path": "/var/log/x", "buf_size": 4096, "new": 1}'  # unknown keys tolerated
    h = run(Harness(), task(UPLOAD_FILE, data, "u1"))
    assert h.agent.uploads == [("u1", UploadRequest(path="/var/log/x", buf_size=4096))]
    assert h.emitted == []  # the uploader emits its own 5100 when the upload ends


def test_metadata_and_shutdown_succeed() -> None:
    h = run(
        Harness(),
        task(SET_METADATA, '{"idc": "idc-1", "region": "eu"}', "m1"),
        task(SET_METADATA, "{}", "m2"),
        task(SHUTDOWN, "", "s1"),
    )
    assert h.agent.metadata == [
        MetadataRequest(idc="idc-1", region="eu"),
        MetadataRequest(idc=None, region=None),
    ]
    assert h.agent.shutdowns == 1
    assert [(r["token"], r["status"]) for r in h.results()] == [
        ("m1", "succeed"),
        ("m2", "succeed"),
        ("s1", "succeed"),
    ]
    assert h.dispatcher.failures == 0


def test_handler_failure_becomes_5100() -> None:
    h = run(Harness(agent=Agent(fail="unknown region 'mars'")), task(SET_METADATA, "{}", "m"))
    assert h.results() == [{"token": "m", "msg": "unknown region 'mars'", "status": "failed"}]


def test_stream_goes_on_after_failures() -> None:
    h = run(
        Harness(),
        task(UPLOAD_FILE, "garbage", "a"),
        b"\xff\xff\xff",
        task(4242, "", "b"),
        task(SHUTDOWN, "", "c"),
    )
    assert [(r["token"], r["status"]) for r in h.results()] == [
        ("a", "failed"),
        ("b", "failed"),
        ("c", "succeed"),
    ]
    assert h.dispatcher.failures == 3


@pytest.mark.parametrize(
    "raw", [b"\xff\xff\xff", b"\x12\x05ab", b"\x0a", b"\x1a\x80\x80\x80\x80\x10"]
)
def test_undecodable_command_is_counted(raw: bytes) -> None:
    h = run(Harness(), raw)
    assert h.dispatcher.failures == 1
    assert h.emitted == []


def test_empty_command_is_the_empty_desired_set() -> None:
    """As the Go agent: the server sends it when a host's last plugin is removed."""
    h = Harness()

    async def body() -> None:
        await h.dispatcher.handle(b"")
        await settle()

    asyncio.run(configs_run(h, body))
    assert h.plugins.syncs == [[]]
    assert h.upgrader.considered == []
    assert h.emitted == []
    assert h.dispatcher.failures == 0


@pytest.mark.parametrize(
    "raw",
    [b"\x10\x01", b"\x18\x07", b"\x0a\x00", b"\x15\x01\x02\x03\x04"],
    ids=["task as varint", "configs as varint", "agent_ctrl as bytes", "task as fixed32"],
)
def test_a_mistyped_command_is_refused_not_read_as_empty(raw: bytes) -> None:
    """upb would read it as no Task and no Configs: the empty set, stopping every plugin."""
    h = Harness()

    async def body() -> None:
        await h.dispatcher.handle(raw)
        await settle()

    asyncio.run(configs_run(h, body))
    assert h.plugins.syncs == []
    assert h.dispatcher.failures == 1


def test_a_command_with_agent_ctrl_and_unknown_fields_is_read() -> None:
    """Field 1 (the server's AgentCtrl) and fields a newer server may add are not errors."""
    h = Harness()

    async def body() -> None:
        await h.dispatcher.handle(b"\x08\x05" + b"\x20\x01")
        await settle()

    asyncio.run(configs_run(h, body))
    assert h.plugins.syncs == [[]]
    assert h.dispatcher.failures == 0


def test_a_command_of_millions_of_unknown_fields_is_refused_quickly() -> None:
    """10 MiB of 2-byte unknown fields: expanding them into Python objects to check their wire
    types held the event loop 7 s and took 500 MB; such a Command is refused at once."""
    h = Harness()
    raw = b"\x78\x00" * (5 * 1024 * 1024)

    async def body() -> None:
        # CPU time, not wall time: a loaded machine stretches the one and not the other.
        started = time.process_time()
        await h.dispatcher.handle(raw)
        assert time.process_time() - started < 1.0
        await settle()

    asyncio.run(configs_run(h, body))
    assert h.plugins.syncs == []  # not read as the empty desired set either
    assert h.dispatcher.failures == 1


def test_a_configs_set_of_a_hundred_thousand_entries_is_refused_whole_and_quickly() -> None:
    """Each entry became a ConfigSpec and was validated on the event loop (~10 us each): a
    10 MiB set held it over a second. A set far beyond any host's plugins is refused as a
    whole; the running plugins stay as they are."""
    command = grpc_pb2.Command()
    for i in range(100_000):
        command.configs.add(name=f"p{i}", version="1", sha256="ab" * 32)
    raw = command.SerializeToString()
    h = Harness()

    async def body() -> None:
        started = time.process_time()  # CPU time: load stretches wall time only
        await h.dispatcher.handle(raw)
        await settle()
        assert time.process_time() - started < 0.5
        await settle()
        assert h.plugins.syncs == []
        assert h.dispatcher.health.counters["config_sets_refused"] == 1
        assert h.dispatcher.health.faulty("configs")
        # The next set that is applied clears the fault.
        await h.dispatcher.handle(b"")
        await settle()
        assert h.plugins.syncs == [[]]
        assert not h.dispatcher.health.faulty("configs")

    asyncio.run(configs_run(h, body))


def test_a_task_without_configs_is_only_the_task() -> None:
    h = Harness()

    async def body() -> None:
        await h.dispatcher.handle(task(SHUTDOWN, "", "s"))
        await settle()

    asyncio.run(configs_run(h, body))
    assert h.agent.shutdowns == 1
    assert h.plugins.syncs == []


def test_task_result_record() -> None:
    record = grpc_pb2.Record.FromString(task_result("tk", True, "done"))
    assert record.data_type == 5100
    assert dict(record.data.fields) == {"token": "tk", "msg": "done", "status": "succeed"}


# --- configs ----------------------------------------------------------------------------------


def configs(*entries: dict[str, Any]) -> bytes:
    return grpc_pb2.Command(configs=[grpc_pb2.Config(**e) for e in entries]).SerializeToString()


SELF = {"name": PRODUCT, "version": "9.9.9", "sha256": "ab" * 32, "download_urls": ["http://u/a"]}
PLUGIN_A = {"name": "a", "type": "tar.gz", "version": "1", "sha256": "01" * 32,
            "download_urls": ["http://h/u1", "https://h:8443/u2"], "detail": "RATE=1"}
PLUGIN_B = {"name": "b", "version": "2", "sha256": "EF" * 32, "signature": "cd" * 32}


async def configs_run(
    h: Harness, body: Callable[[], Awaitable[None]]
) -> None:
    runner = asyncio.create_task(h.dispatcher.run_configs())
    try:
        await body()
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_configs_routed_to_upgrader_and_plugins() -> None:
    h = Harness()

    async def body() -> None:
        await h.dispatcher.handle(configs(PLUGIN_A, SELF, PLUGIN_B))
        await settle()

    asyncio.run(configs_run(h, body))
    assert [c.name for c in h.upgrader.considered] == [PRODUCT]
    assert h.upgrader.withdrawn == 0
    assert h.upgrader.considered[0].version == "9.9.9"
    assert h.upgrader.considered[0].download_urls == ("http://u/a",)
    assert h.plugins.syncs == [
        [
            ConfigSpec("a", "tar.gz", "1", "01" * 32, "", ("http://h/u1", "https://h:8443/u2"),
                       "RATE=1"),
            ConfigSpec("b", "", "2", "EF" * 32, "cd" * 32, (), ""),
        ]
    ]
    assert h.emitted == []


def test_configs_latest_wins() -> None:
    h = Harness()
    h.plugins.gate = asyncio.Event()  # hold the first sync, as a long download would
    applied: list[Sequence[ConfigSpec]] = []

    async def on_applied(plugins: Sequence[ConfigSpec]) -> None:
        applied.append(plugins)

    h.dispatcher.on_applied = on_applied

    async def body() -> None:
        assert h.plugins.gate is not None
        await h.dispatcher.handle(configs(PLUGIN_A))
        await settle()
        assert [[c.name for c in s] for s in h.plugins.syncs] == [["a"]]
        # While the first set is being applied, two more arrive: only the last is applied,
        # and at once, not after the first (the supervisor supersedes the first).
        await h.dispatcher.handle(configs(PLUGIN_B))
        await h.dispatcher.handle(configs(PLUGIN_A, PLUGIN_B, SELF))
        await settle()
        assert [[c.name for c in s] for s in h.plugins.syncs] == [["a"], ["a", "b"]]
        # Tasks are not blocked by the sync in progress.
        await h.dispatcher.handle(task(SHUTDOWN, "", "s"))
        assert h.agent.shutdowns == 1
        h.plugins.gate.set()
        await settle()
        assert [[c.name for c in s] for s in h.plugins.syncs] == [["a"], ["a", "b"]]
        # Only the newest set is saved for the next start.
        assert [[c.name for c in s] for s in applied] == [["a", "b"]]
        assert [c.version for c in h.upgrader.considered] == ["9.9.9"]
        assert h.upgrader.withdrawn == 1  # the first set had no entry for the agent
        # A Command with an empty Configs list encodes to nothing: the empty desired set.
        # It has no entry for the agent either: an upgrade under way is no longer wanted.
        await h.dispatcher.handle(grpc_pb2.Command(configs=[]).SerializeToString())
        await settle()
        assert h.upgrader.withdrawn == 2

    asyncio.run(configs_run(h, body))
    assert [[c.name for c in s] for s in h.plugins.syncs] == [["a"], ["a", "b"], []]


def test_task_and_configs_in_one_command() -> None:
    h = Harness()
    raw = grpc_pb2.Command(
        task=grpc_pb2.Task(data_type=SHUTDOWN, object_name=PRODUCT, token="both"),
        configs=[grpc_pb2.Config(**PLUGIN_B)],
    ).SerializeToString()

    async def body() -> None:
        await h.dispatcher.handle(raw)
        await settle()

    asyncio.run(configs_run(h, body))
    assert h.agent.shutdowns == 1
    assert [[c.name for c in s] for s in h.plugins.syncs] == [["b"]]


# --- validation at the edge -------------------------------------------------------------------

GOOD = {"name": "good", "version": "1", "sha256": "ab" * 32, "download_urls": ["http://h/g"]}
BAD_ENTRIES = {
    "port out of range": ({"download_urls": ["http://127.0.0.1:99999/p"]}, "download_urls[0]"),
    "broken IPv6 host": ({"download_urls": ["http://h/ok", "http://[::1/p"]}, "download_urls[1]"),
    "ftp scheme": ({"download_urls": ["ftp://h/p"]}, "scheme"),
    "no host": ({"download_urls": ["http:///p"]}, "no host"),
    "NUL in URL": ({"download_urls": ["http://h/p\x00x"]}, "control character"),
    "NUL in detail": ({"detail": "A=1\x00B=2"}, "detail"),
    "name with slash": ({"name": "a/b"}, "name"),
    "name too long": ({"name": "n" * 65}, "name"),
    "name with newline": ({"name": "bad\n"}, "name"),
    "empty version": ({"version": ""}, "version"),
    "short sha256": ({"sha256": "ab"}, "sha256"),
    "signature not hex": ({"signature": "zz" * 32}, "signature"),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_a_refused_entry_is_skipped_and_the_rest_applied(case: str) -> None:
    change, field = BAD_ENTRIES[case]
    bad = {**GOOD, "name": "bad", **change}
    h = Harness()

    async def body() -> None:
        await h.dispatcher.handle(configs(bad, GOOD))
        await settle()

    asyncio.run(configs_run(h, body))
    assert [[c.name for c in s] for s in h.plugins.syncs] == [["good"]]
    assert h.dispatcher.health.counters["config_entries_refused"] == 1
    (detail,) = h.dispatcher.health.details()
    assert detail.startswith("config entries: 1 refused")
    assert field in detail
    # A valid name whose entry was refused is held: a running plugin of that name stays.
    assert h.plugins.holds == [{bad["name"]} if "name" not in change else set()]


def test_a_refused_agent_entry_does_not_reach_the_upgrader() -> None:
    h = Harness()

    async def body() -> None:
        await h.dispatcher.handle(configs({**SELF, "download_urls": ["http://[::1/x"]}, GOOD))
        await settle()

    asyncio.run(configs_run(h, body))
    assert h.upgrader.considered == []
    assert [[c.name for c in s] for s in h.plugins.syncs] == [["good"]]


def test_a_clean_set_clears_the_refusal_fault() -> None:
    h = Harness()

    async def body() -> None:
        await h.dispatcher.handle(configs({**GOOD, "sha256": "x"}))
        await settle()
        assert h.dispatcher.health.faulty("config entries")
        await h.dispatcher.handle(configs(GOOD))
        await settle()

    asyncio.run(configs_run(h, body))
    assert not h.dispatcher.health.faulty("config entries")
    assert h.dispatcher.health.counters["config_entries_refused"] == 1


def test_a_thousand_entries_are_capped_and_counted() -> None:
    entries = [{**GOOD, "name": f"p{i}"} for i in range(1000)]
    h = Harness()

    async def body() -> None:
        await h.dispatcher.handle(configs(*entries, SELF))
        await settle()

    asyncio.run(configs_run(h, body))
    (applied,) = h.plugins.syncs
    assert [c.name for c in applied] == [f"p{i}" for i in range(MAX_PLUGINS)]
    counters = h.dispatcher.health.counters
    assert counters["config_entries_over_limit"] == 1000 - MAX_PLUGINS
    assert counters["config_entries_refused"] == 1000 - MAX_PLUGINS
    # The agent's own entry is not a plugin: it is never capped away.
    assert [c.name for c in h.upgrader.considered] == [PRODUCT]
    assert len(h.dispatcher.health.details()[0]) <= 400


BAD_TASKS = {
    "relative path": (UPLOAD_FILE, {"path": "etc/passwd", "buf_size": 1}, "absolute"),
    "NUL in path": (UPLOAD_FILE, {"path": "/etc/pass\x00wd", "buf_size": 1}, "NUL"),
    "empty path": (UPLOAD_FILE, {"path": "", "buf_size": 1}, "$.path"),
    "buf_size zero": (UPLOAD_FILE, {"path": "/x", "buf_size": 0}, "$.buf_size"),
    "buf_size huge": (UPLOAD_FILE, {"path": "/x", "buf_size": 1 << 40}, "$.buf_size"),
    "buf_size float": (UPLOAD_FILE, {"path": "/x", "buf_size": 1.5}, "$.buf_size"),
    "buf_size null": (UPLOAD_FILE, {"path": "/x", "buf_size": None}, "$.buf_size"),
    "idc with CR": (SET_METADATA, {"idc": "x\rLD_PRELOAD=/tmp/evil.so"}, "$.idc"),
    "idc with LF": (SET_METADATA, {"idc": "x\nLD_PRELOAD=/tmp/evil.so"}, "$.idc"),
    "idc with quote": (SET_METADATA, {"idc": 'x"y'}, "$.idc"),
    "idc empty": (SET_METADATA, {"idc": ""}, "$.idc"),
    "region too long": (SET_METADATA, {"region": "r" * 65}, "$.region"),
    "region an object": (SET_METADATA, {"region": {"a": 1}}, "$.region"),
}


@pytest.mark.parametrize("case", sorted(BAD_TASKS))
def test_bad_task_fields_are_refused_naming_the_field(case: str) -> None:
    data_type, data, needle = BAD_TASKS[case]
    h = run(Harness(), task(data_type, json.dumps(data), token="t"))
    (result,) = h.results()
    assert result["status"] == "failed"
    assert needle in result["msg"]
    assert h.agent.uploads == []
    assert h.agent.metadata == []


def test_good_metadata_values_pass() -> None:
    h = run(Harness(), task(SET_METADATA, '{"idc": "dc-7.a_b", "region": "cn-north-1"}', "m"))
    assert h.agent.metadata == [MetadataRequest(idc="dc-7.a_b", region="cn-north-1")]


# --- containment --------------------------------------------------------------------------------


class Broken:
    """Every handler has a defect: it raises something that is not TaskFailed."""

    async def upload(self, token: str, request: UploadRequest) -> None:
        raise RuntimeError("upload defect")

    async def set_metadata(self, request: MetadataRequest) -> None:
        raise KeyError("metadata defect")

    async def shutdown(self) -> None:
        raise ValueError("shutdown defect")

    async def send_task(self, task: TaskSpec) -> None:
        raise ZeroDivisionError

    async def sync(self, configs: Sequence[ConfigSpec], hold: Collection[str] = ()) -> None:
        raise RuntimeError("sync defect")

    async def consider(self, config: ConfigSpec) -> None:
        raise RuntimeError("upgrade defect")

    async def withdraw(self) -> None:
        raise RuntimeError("upgrade defect")


def test_sets_sent_faster_than_applied_are_held_to_three() -> None:
    """A server pushing sets faster than the supervisor takes them: at most two in their
    tasks and one waiting, the rest replaced by the newest (not a task each)."""
    h = Harness()
    h.plugins.gate = asyncio.Event()  # no sync returns: the lock of a stopping plugin

    async def body() -> None:
        assert h.plugins.gate is not None
        for i in range(50):
            entry = {**PLUGIN_B, "version": str(i)}
            await h.dispatcher.handle(configs(entry))
            await settle()
        tasks = [t for t in asyncio.all_tasks() if t.get_name().startswith("configs-")]
        assert len(tasks) == 2
        assert [[c.version for c in s] for s in h.plugins.syncs] == [["0"], ["1"]]
        h.plugins.gate.set()
        await settle()

    asyncio.run(configs_run(h, body))
    assert [[c.version for c in s] for s in h.plugins.syncs] == [["0"], ["1"], ["49"]]


def test_a_defect_in_a_task_handler_ends_only_that_task() -> None:
    broken = Broken()
    h = Harness(agent=broken, plugins=broken)  # type: ignore[arg-type]
    run(
        h,
        task(UPLOAD_FILE, '{"path": "/x", "buf_size": 1}', "u"),
        task(SET_METADATA, "{}", "m"),
        task(SHUTDOWN, "", "s"),
        task(7, "", "p", object_name="plug"),
    )
    results = {r["token"]: r for r in h.results()}
    assert set(results) == {"u", "m", "s", "p"}
    assert all(r["status"] == "failed" for r in results.values())
    assert "upload defect" in results["u"]["msg"]
    assert "internal error" in results["p"]["msg"]
    assert h.dispatcher.failures == 4
    assert h.dispatcher.health.counters["task_errors"] == 4
    assert h.dispatcher.health.faulty("tasks")
    # The next task that completes clears the fault.
    h.agent = h.dispatcher.agent = Agent()
    run(h, task(SHUTDOWN, "", "s2"))
    assert not h.dispatcher.health.faulty("tasks")


def test_a_defect_in_sync_or_upgrade_does_not_end_run_configs() -> None:
    broken = Broken()
    h = Harness(plugins=broken)
    h.upgrader = h.dispatcher.upgrader = broken  # type: ignore[assignment]

    async def body() -> None:
        for _ in range(3):
            await h.dispatcher.handle(configs(SELF, GOOD))
            await settle()

    asyncio.run(configs_run(h, body))
    health = h.dispatcher.health
    assert health.counters["config_errors"] == 6  # 3 upgrade entries, 3 sets
    assert health.faulty("configs")
    assert health.faulty("upgrade config")
