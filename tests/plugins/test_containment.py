"""One plugin's bad entry, download, spawn or serving never stops the others or the supervisor.

Real supervisor, real HTTP downloads, real plugin processes; the Config entries given straight
to `PluginSupervisor.sync` bypass the dispatcher's validation on purpose: the supervisor must
contain what slips through.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from pathlib import Path

import pytest
from plugtools import (
    Harness,
    alive,
    files_server,
    install_plugin,
    local_spec,
    pids_in_group,
    run,
    sh_plugin,
    sha,
)
from plugtools import until as until_

from elkeid_agent.commands import ConfigSpec, Dispatcher
from elkeid_agent.plugins import process
from elkeid_agent.plugins.lifecycle import State
from elkeid_agent.plugins.supervisor import PluginSupervisor

SERVE = "exec cat <&3 >/dev/null"


def _pid(sup: PluginSupervisor, name: str) -> int | None:
    info = sup.slot_info(name)
    return None if info is None else info[3]


async def _running(sup: PluginSupervisor, name: str) -> int:
    await until_(lambda: _pid(sup, name) is not None, what=f"{name} running")
    pid = _pid(sup, name)
    assert pid is not None
    return pid


def test_bad_url_and_nul_detail_do_not_stop_the_others(tmp_path: Path) -> None:
    good = sh_plugin(SERVE)

    async def main() -> None:
        with files_server() as files:
            files.files["/good"] = good
            bad_port = ConfigSpec(
                "port", version="1", sha256=sha(good), download_urls=("http://127.0.0.1:99999/p",)
            )
            bad_host = ConfigSpec(
                "ipv6", version="1", sha256=sha(good), download_urls=("http://[::1/p",)
            )
            install_plugin(tmp_path, "nul", good)
            nul_detail = local_spec("nul", good, detail="A=1\x00B=2")
            ok = ConfigSpec(
                "ok", version="1", sha256=sha(good), download_urls=(files.url("/good"),)
            )
            async with Harness(tmp_path) as h:
                await h.sup.sync([bad_port, bad_host, nul_detail, ok])
                await _running(h.sup, "ok")
                errors = " | ".join(h.sup.errors())
                assert "plugin port" in errors
                assert "plugin ipv6" in errors
                # The NUL reaches posix_spawn: its ValueError ends that spawn, not the slot.
                await until_(lambda: "plugin nul is down" in " ".join(h.sup.errors()))
                assert "cannot start" in " ".join(h.sup.errors())
                assert h.sup.health.counters["plugin_spawn_failures"] >= 1
                assert h.sup.health.counters["plugin_sync_failures"] == 2
                # The supervisor is alive and syncs again.
                await h.sup.sync([ok])
                assert h.sup.errors() == []

    run(main())


def test_a_refused_entry_keeps_the_running_plugin(tmp_path: Path) -> None:
    """A bad push for a healthy plugin must not uninstall it."""
    exe = sh_plugin(SERVE)

    async def main() -> None:
        with files_server() as files:
            files.files["/k"] = exe
            good = {"name": "k", "version": "1", "sha256": sha(exe),
                    "download_urls": [files.url("/k")]}
            async with Harness(tmp_path) as h:
                emitted: list[bytes] = []
                d = Dispatcher(_NoTasks(), h.sup, _NoUpgrade(), emitted.append, health=h.sup.health)
                runner = asyncio.create_task(d.run_configs())
                try:
                    await d.handle(_configs(good))
                    pid = await _running(h.sup, "k")
                    for change in ({"download_urls": ["http://[::1/p"]}, {"detail": "x\x00"},
                                   {"sha256": "nope", "version": "2"}):
                        await d.handle(_configs({**good, **change}))
                        await until_(lambda: d.health.faulty("config entries"))
                        await asyncio.sleep(0.3)
                        assert _pid(h.sup, "k") == pid
                        assert (tmp_path / "plugin/k/k").read_bytes() == exe
                        d.health.clear("config entries")
                    # An empty Command is the empty set: now it goes.
                    await d.handle(b"")
                    await until_(lambda: not alive(pid), what="plugin stopped")
                    await until_(lambda: not (tmp_path / "plugin/k").exists(), what="dir gone")
                finally:
                    runner.cancel()
                    await asyncio.gather(runner, return_exceptions=True)
                assert emitted == []

    run(main())


def test_a_defect_while_serving_ends_only_that_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception out of `PluginProcess.serve` is one failed run: restarted after backoff."""
    exe = sh_plugin(SERVE)
    calls = {"n": 0}
    serve = process.PluginProcess.serve

    async def flaky(self: process.PluginProcess, stop: asyncio.Event) -> process.Outcome:
        calls["n"] += 1
        if calls["n"] == 1:
            self._kill_group()
            await self._wait_exit()
            self._reap()
            self._release()
            raise RuntimeError("serve defect")
        return await serve(self, stop)

    monkeypatch.setattr(process.PluginProcess, "serve", flaky)

    async def main() -> None:
        install_plugin(tmp_path, "f", exe)
        async with Harness(tmp_path) as h:
            await h.sup.sync([local_spec("f", exe)])
            await until_(lambda: calls["n"] >= 2, what="restart after the defect")
            await _running(h.sup, "f")
            assert h.sup.health.counters["plugin_errors"] == 1
            info = h.sup.slot_info("f")
            assert info is not None
            assert info[1] == 1

    run(main())


def test_stderr_is_private_and_the_service_manager_variables_stay_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in {
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": str(os.getpid()),
        "LISTEN_FDS": "1",
        "LISTEN_PID": str(os.getpid()),
        "_MEIPASS2": "/tmp/_MEI1",
        "STATICX_BUNDLE_DIR": "/tmp/staticx-1",
    }.items():
        monkeypatch.setenv(key, value)
    exe = sh_plugin(f"env > env.txt\necho to-stderr >&2\n{SERVE}")
    directory = install_plugin(tmp_path, "s", exe)
    # A file left by an older agent with a wider mode.
    (directory / "s.stderr").write_text("old")
    (directory / "s.stderr").chmod(0o644)

    async def main() -> None:
        async with Harness(tmp_path) as h:
            await h.sup.sync([local_spec("s", exe)])
            await _running(h.sup, "s")
            out = directory / "env.txt"
            await until_(lambda: out.exists() and out.stat().st_size > 0)
            await until_(lambda: (directory / "s.stderr").read_text() == "to-stderr\n")

    run(main())
    assert stat.S_IMODE((directory / "s.stderr").stat().st_mode) == 0o600
    names = {line.split("=", 1)[0] for line in (directory / "env.txt").read_text().splitlines()}
    leaked = {n for n in names if n == "NOTIFY_SOCKET" or n.startswith(
        ("WATCHDOG_", "LISTEN_", "_MEI", "_PYI", "STATICX_"))}
    assert leaked == set()


class _NoTasks:
    async def upload(self, token: str, request: object) -> None:
        raise AssertionError

    async def set_metadata(self, request: object) -> None:
        raise AssertionError

    async def shutdown(self) -> None:
        raise AssertionError


def _configs(*entries: dict[str, object]) -> bytes:
    from elkeid_agent._proto import grpc_pb2

    return grpc_pb2.Command(
        configs=[grpc_pb2.Config(**e) for e in entries]  # type: ignore[arg-type]
    ).SerializeToString()


class _NoUpgrade:
    async def consider(self, config: ConfigSpec) -> None:
        pass

    async def withdraw(self) -> None:
        pass


@pytest.mark.parametrize("kind", ["not utf-8", "a directory", "wrong types"])
def test_a_bad_pgids_file_does_not_stop_the_supervisor(tmp_path: Path, kind: str) -> None:
    """`.pgids` comes from the disk: whatever it holds, plugins still start."""
    import json
    import subprocess

    from elkeid_agent.plugins import orphans

    exe = sh_plugin(SERVE)
    install_plugin(tmp_path, "p", exe)
    pgids = tmp_path / "plugin" / orphans.PGIDS_FILE
    group = None
    if kind == "not utf-8":
        pgids.write_bytes(b"\xff\xfe{\x80}\n")
    elif kind == "a directory":
        pgids.mkdir()
    else:
        # A live group with a member that is not its leader, recorded with a start time that
        # is not a number: comparing them raises TypeError inside the reaping.
        group = subprocess.Popen(["sh", "-c", "sleep 30 & wait"], start_new_session=True)
        deadline = time.monotonic() + 10
        while len(pids_in_group(group.pid)) < 2:
            assert time.monotonic() < deadline, "the group's second member never came"
            time.sleep(0.02)
        record = {"pgid": group.pid, "start_ticks": "x", "boot_id": orphans.boot_id(),
                  "directory": str(tmp_path)}
        pgids.write_text(json.dumps(record) + "\n")

    async def main() -> None:
        async with Harness(tmp_path) as h:
            await h.sup.sync([local_spec("p", exe)])
            await _running(h.sup, "p")
            if kind == "wrong types":
                assert h.sup.health.counters["orphan_reap_errors"] == 1

    try:
        run(main())
    finally:
        if group is not None:
            os.killpg(group.pid, 9)
            group.wait()


def test_a_defect_in_one_slot_ends_only_that_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from elkeid_agent.plugins import supervisor

    real = supervisor.backoff_delay

    def broken(failures: int) -> float:
        raise RuntimeError("backoff defect")

    exits = sh_plugin("exit 1")
    serves = sh_plugin(SERVE)
    install_plugin(tmp_path, "dies", exits)
    install_plugin(tmp_path, "lives", serves)
    monkeypatch.setattr(supervisor, "backoff_delay", broken)

    async def main() -> None:
        async with Harness(tmp_path) as h:
            await h.sup.sync([local_spec("dies", exits), local_spec("lives", serves)])
            pid = await _running(h.sup, "lives")
            # "dies" exits, its backoff raises: that slot ends, nothing else does.
            await until_(lambda: "supervision failed" in " ".join(h.sup.errors()))
            assert h.sup.health.counters["plugin_errors"] == 1
            assert _pid(h.sup, "lives") == pid
            assert alive(pid)
            # The next sync starts it afresh.
            monkeypatch.setattr(supervisor, "backoff_delay", real)
            await h.sup.sync([local_spec("dies", exits), local_spec("lives", serves)])
            info = h.sup.slot_info("dies")
            assert info is not None
            assert info[0] is not State.STOPPED

    run(main())
