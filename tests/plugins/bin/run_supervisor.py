"""A supervisor alone in a process (for the SIGKILL/SIGTERM tests).

argv: work_dir, then plugin names already installed in work_dir/plugin/<name>/<name>.
Environment: ELKEID_TEST_CGROUP, the plugin cgroup group (plugins.cgroup_name);
ELKEID_TEST_CGROUPS=0 turns plugin cgroups off (the subreaper fallback).
Prints "limits <line>", then "ready <pid>..." once every plugin runs; SIGTERM stops the plugins
and exits 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import uvloop

from elkeid_agent.buffer import RecordBuffer
from elkeid_agent.commands import ConfigSpec
from elkeid_agent.config import PluginsConfig
from elkeid_agent.download import sha256_file
from elkeid_agent.plugins.supervisor import PluginSupervisor


async def main(work: Path, names: list[str]) -> None:
    buffer = RecordBuffer()
    config = PluginsConfig(
        cgroup_name=os.environ["ELKEID_TEST_CGROUP"],
        cgroups=os.environ.get("ELKEID_TEST_CGROUPS") != "0",
    )
    sup = PluginSupervisor(work, buffer, config)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(sup.run())
        specs = [
            ConfigSpec(name=n, version="1", sha256=sha256_file(work / "plugin" / n / n))
            for n in names
        ]
        await sup.sync(specs)
        print("limits", sup.limits_state, flush=True)
        while True:
            pids = [sup.slot_info(n)[3] for n in names]  # type: ignore[index]
            if all(pids):
                break
            await asyncio.sleep(0.02)
        print("ready", *pids, flush=True)
        await stopping.wait()
        await sup.stop()
        await runner


if __name__ == "__main__":
    uvloop.run(main(Path(sys.argv[1]), sys.argv[2:]))
