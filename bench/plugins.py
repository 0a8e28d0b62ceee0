"""Plugin benchmark (issue 3): records through a real plugin, the real agent and mTLS to a sink.

For each scenario a fresh agent (`python -m elkeid_agent run`, compression `none`) runs one
plugin, `bench-flood`, that writes 300-byte Record frames (data_type 9999, a fixed-width
`seq`) to fd 4 — as fast as the pipe takes them (`flood`), or at a fixed rate in 200 ms
bursts, like the Go library's flush timer. The sink AgentCenter (this file with `--sink`, a
child process) pushes the plugin's Config on the first heartbeat, counts the 9999 records
it receives and writes its tally to a file.

Printed per scenario:
* delivered records/s: records the sink counted over the time from the first to the last,
* loss: records the plugin wrote minus records the sink counted, after the plugin finished
  and the agent had 15 s to deliver the rest,
* agent CPU %: CPU time of every agent process (the agent and its ancestors of the same
  command line; plugins excluded) over the scenario's wall time, in % of one core,
* RSS: of the agent processes at the end of the scenario, MiB.

`idle` runs the agent with a plugin that writes nothing, for --idle-seconds (60 by default, so
one 60 s heartbeat tick is inside the window).

`spool` (issue 11) runs the 5,000 records/s scenario --rounds times with the spool enabled and
as often with `[spool] enabled = false`, alternating (on off off on on off ...), server up:
CPU % (the agent processes' own CPU time, so other load on the machine counts little) and the
largest RSS seen (sampled every 100 ms) of each, and enabled / disabled.

    .venv/bin/python bench/plugins.py [--seconds 20] [--idle-seconds 60] [--rounds 3]
                                      [--only flood,5000,20000,idle,spool]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchplugin import FRAME_CODE  # beside this file
from procstat import (  # beside this file
    PLUGIN_CGROUP,
    agent_group,
    cpu_seconds,
    rss_bytes,
    start_sink,
)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from elkeid_agent.wire import encode_varint  # noqa: E402 - needs ROOT on the path

RECORD_BYTES = 300
# How each of the plugin's records starts in a PackagedData: field 1, its length (all are
# RECORD_BYTES long), data_type 9999. Nothing else in a message matches: a 0x0A inside a
# record (a map entry's key, a length of 10) is followed by a length under 300 or by ASCII,
# never by 0xAC; the agent's own records have other data_types.
RECORD_MARK = b"\x0a" + encode_varint(RECORD_BYTES) + b"\x08" + encode_varint(9999)
SETTLE_SECONDS = 15.0

# The plugin: pre-encoded frames with a 10-digit seq patched in, written in 512 KiB chunks
# (the Go library's buffer size). Its own CPU is not part of the agent's figures.
PLUGIN = FRAME_CODE + r"""
import os, sys, time
rate = float(os.environ.get("RATE", "0"))
duration = float(os.environ.get("DURATION", "0"))
out = os.fdopen(4, "wb", buffering=0)
per_chunk = 512 * 1024 // len(frame)
sent = 0
began = time.monotonic()
if duration:
    if rate:
        tick = 0.2
        burst = max(1, int(rate * tick))
        while time.monotonic() - began < duration:
            out.write(b"".join(head + b"%010d" % i + tail for i in range(sent, sent + burst)))
            sent += burst
            next_at = began + (sent / rate)
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    else:
        while time.monotonic() - began < duration:
            out.write(b"".join(head + b"%010d" % i + tail for i in range(sent, sent + per_chunk)))
            sent += per_chunk
with open("sent.tmp", "w") as f:
    f.write(str(sent))
os.rename("sent.tmp", "sent")
os.read(3, 1)  # stay up until the agent closes the task pipe
"""


# --- the sink (child process) -------------------------------------------------------------------


async def sink(certs_dir: str, configs: list[dict[str, Any]], tally_file: str) -> None:
    import grpc

    from elkeid_agent._proto import grpc_pb2
    from elkeid_center.certs import ensure_certs
    from elkeid_center.server import SERVER_OPTIONS, ServerTls, configs_command, transfer_handler

    tls = ServerTls.from_certs(ensure_certs(certs_dir))
    command = configs_command(configs)
    state = {"count": 0, "first": 0.0, "last": 0.0}

    def save() -> None:
        tmp = tally_file + ".tmp"
        Path(tmp).write_text(json.dumps(state))
        os.replace(tmp, tally_file)

    async def transfer(requests: Any, context: Any) -> Any:
        pushed = False
        async for raw in requests:
            # Fails unless `raw` is a PackagedData (the records' payloads are bytes to it).
            message = grpc_pb2.PackagedData.FromString(raw)
            # The plugin's records, counted in C: a Python object per record made this sink,
            # which shares the machine's CPUs with the agent, a bottleneck in the flood.
            n = raw.count(RECORD_MARK)
            assert n <= len(message.records)
            if n:
                now = time.time()
                if not state["count"]:
                    state["first"] = now
                state["count"] += n
                state["last"] = now
                save()
            if not pushed and any(r.data_type == 1000 for r in message.records):
                pushed = True
                yield command

    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((transfer_handler(transfer),))
    port = server.add_secure_port("127.0.0.1:0", tls.credentials())
    await server.start()
    save()
    print(f"PORT {port}", flush=True)
    await server.wait_for_termination()


# --- the bench (this process) --------------------------------------------------------------------


class Run:
    """A sink and an agent running one plugin, in a temporary directory."""

    def __init__(
        self, name: str, script: str, detail: str, agent_cmd: list[str], spool: bool = True
    ) -> None:
        from elkeid_center.agent_config import write_agent_config
        from elkeid_center.certs import ensure_certs

        self._tmp = tempfile.TemporaryDirectory(prefix="bench-plugins-")
        base = Path(self._tmp.name)
        certs = ensure_certs(base / "certs")
        work = base / "work"
        self.plugin_dir = work / "plugin" / name
        self.plugin_dir.mkdir(parents=True)
        exe = self.plugin_dir / name
        (self.plugin_dir / "plugin.py").write_text(script)
        exe.write_text(
            f"#!/bin/sh\nexport $DETAIL RECORD_BYTES={RECORD_BYTES}\n"
            f"exec '{sys.executable}' plugin.py\n"
        )
        exe.chmod(0o755)
        sha256 = hashlib.sha256(exe.read_bytes()).hexdigest()
        configs = [{"name": name, "version": "1", "sha256": sha256, "detail": detail}]
        (base / "configs.json").write_text(json.dumps(configs))
        self.tally_file = base / "tally.json"
        self.sink, address = start_sink(
            [sys.executable, __file__, "--sink", str(certs.directory),
             str(base / "configs.json"), str(self.tally_file)]
        )
        config = write_agent_config(
            base / "agent.toml",
            work,
            certs.directory,
            {"default": {"private": address}},
            compression="none",
            plugin_cgroup=PLUGIN_CGROUP,
        )
        if not spool:
            config.write_text(config.read_text() + "\n[spool]\nenabled = false\n")
        self.agent = subprocess.Popen(
            [*agent_cmd, "run", "--config", str(config)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # The plugin starts once the agent is connected and synced: measure from there.
        stderr = self.plugin_dir / f"{name}.stderr"
        deadline = time.monotonic() + 30
        while not stderr.exists():
            if time.monotonic() > deadline or self.agent.poll() is not None:
                self.close()
                raise SystemExit("the agent did not start the plugin within 30 s")
            time.sleep(0.02)
        # The plugin runs `plugin.py`; every other descendant is the agent's (a frozen build's
        # launchers run it under the names staticx and PyInstaller give it). Taken once the
        # plugin has exec'd its script, so that its shell is not counted as the agent.
        def is_plugin(cmdline: list[str]) -> bool:
            return "plugin.py" in cmdline

        while True:
            self.group = agent_group(self.agent.pid, is_plugin)
            if len(agent_group(self.agent.pid, lambda c: False)) > len(self.group):
                break
            if time.monotonic() > deadline:
                self.close()
                raise SystemExit("the plugin did not run its script within 30 s")
            time.sleep(0.02)

    def tally(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.tally_file.read_text())
        return result

    def close(self) -> None:
        self.agent.terminate()
        self.agent.wait(20)
        self.sink.kill()
        self.sink.wait()
        self._tmp.cleanup()


def scenario(
    name: str, rate: float, seconds: float, agent_cmd: list[str], spool: bool = True
) -> dict[str, Any]:
    run = Run("bench-flood", PLUGIN, f"RATE={rate:g} DURATION={seconds:g}", agent_cmd, spool)
    try:
        cpu0, wall0 = cpu_seconds(run.group), time.monotonic()
        sent_file = run.plugin_dir / "sent"
        deadline = wall0 + seconds + 60
        rss_max = 0
        while not sent_file.exists() and time.monotonic() < deadline:
            rss_max = max(rss_max, rss_bytes(run.group))
            time.sleep(0.1)
        sent = int(sent_file.read_text()) if sent_file.exists() else -1
        tally = run.tally()
        settle = time.monotonic() + SETTLE_SECONDS
        while tally["count"] < sent and time.monotonic() < settle:
            time.sleep(0.05)
            tally = run.tally()
        wall = time.monotonic() - wall0
        cpu = cpu_seconds(run.group) - cpu0
        memory = rss_bytes(run.group)
    finally:
        run.close()
    span = tally["last"] - tally["first"]
    return {
        "sent": sent,
        "delivered": tally["count"],
        "rate": tally["count"] / span if span > 0 else 0.0,
        "loss": sent - tally["count"],
        "cpu_pct": 100 * cpu / wall,
        "rss_mib": memory / 2**20,
        "rss_max_mib": max(rss_max, memory) / 2**20,
        "wall": wall,
    }


def spool_on_off(rate: float, seconds: float, rounds: int, agent_cmd: list[str]) -> None:
    """Steady state, server up: the spool enabled against disabled, alternating."""
    runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    for i in range(rounds):
        for enabled in (True, False) if i % 2 == 0 else (False, True):
            r = scenario(f"{int(rate)}/s", rate, seconds, agent_cmd, enabled)
            runs[enabled].append(r)
            print(
                f"  round {i + 1} spool {'on ' if enabled else 'off'}  CPU {r['cpu_pct']:6.3f} %"
                f"  RSS max {r['rss_max_mib']:6.1f} MiB  loss {r['loss']}",
                flush=True,
            )

    def cpu(enabled: bool) -> float:
        return sum(r["cpu_pct"] for r in runs[enabled]) / rounds

    def rss(enabled: bool) -> float:
        return max(r["rss_max_mib"] for r in runs[enabled])

    print(
        f"{'spool':<8} {int(rate)}/s, {rounds} rounds of {seconds:g} s each:"
        f"  on CPU {cpu(True):6.3f} % RSS {rss(True):6.1f} MiB"
        f"  off CPU {cpu(False):6.3f} % RSS {rss(False):6.1f} MiB"
        f"  on/off CPU {cpu(True) / cpu(False):5.3f} RSS {rss(True) / rss(False):5.3f}"
        f"   {TARGETS['spool']}",
        flush=True,
    )


IDLE_PLUGIN = "import os\nos.read(3, 1)\n"


def idle(seconds: float, agent_cmd: list[str]) -> dict[str, Any]:
    run = Run("bench-idle", IDLE_PLUGIN, "", agent_cmd)
    try:
        time.sleep(3)  # the first heartbeat and sync settle
        cpu0, wall0 = cpu_seconds(run.group), time.monotonic()
        time.sleep(seconds)
        wall = time.monotonic() - wall0
        cpu = cpu_seconds(run.group) - cpu0
        memory = rss_bytes(run.group)
    finally:
        run.close()
    return {"cpu_pct": 100 * cpu / wall, "rss_mib": memory / 2**20, "wall": wall}


TARGETS = {
    "flood": "target >= 200,000 records/s, 0 loss (Go: 20,433/s, 96.9 % lost)",
    "5000/s": "target <= 1.0 % CPU (Go: 1.0 %)",
    "20000/s": "target <= 2.7 % CPU (Go: 2.7 %, 7.5 % lost)",
    "idle": "target <= 0.13 % CPU (Go: 0.13 %, 12.6 MiB)",
    "spool": "target: on/off <= 1.05 for CPU and RSS",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sink", nargs=3, metavar=("CERTS", "CONFIGS", "TALLY"))
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="flood,5000,20000,idle,spool")
    parser.add_argument(
        "--agent",
        default=f"{sys.executable} -m elkeid_agent",
        help="command that starts the agent (e.g. a frozen build's path)",
    )
    args = parser.parse_args()
    if args.sink:
        import uvloop

        certs_dir, configs_file, tally_file = args.sink
        configs = json.loads(Path(configs_file).read_text())
        uvloop.run(sink(certs_dir, configs, tally_file))
        return
    agent_cmd = args.agent.split()
    wanted = args.only.split(",")
    print(
        f"bench/plugins.py: {RECORD_BYTES}-byte records, compression none, "
        f"{os.cpu_count()} CPUs, agent: {args.agent}"
    )
    for name in wanted:
        if name == "idle":
            r = idle(args.idle_seconds, agent_cmd)
            print(
                f"{'idle':<8} {'':>12} {'':>16} CPU {r['cpu_pct']:6.3f} %  "
                f"RSS {r['rss_mib']:6.1f} MiB  over {r['wall']:.0f} s   {TARGETS['idle']}"
            )
            continue
        if name == "spool":
            spool_on_off(5000.0, args.seconds, args.rounds, agent_cmd)
            continue
        rate = 0.0 if name == "flood" else float(name)
        label = "flood" if name == "flood" else f"{int(rate)}/s"
        r = scenario(label, rate, args.seconds, agent_cmd)
        loss_pct = 100 * r["loss"] / r["sent"] if r["sent"] > 0 else float("nan")
        print(
            f"{label:<8} {r['rate']:>10,.0f}/s  loss {r['loss']:>7} ({loss_pct:4.1f} %)"
            f"  CPU {r['cpu_pct']:6.2f} %  RSS {r['rss_mib']:6.1f} MiB"
            f"  sent {r['sent']:,} delivered {r['delivered']:,}   {TARGETS[label]}",
            flush=True,
        )


if __name__ == "__main__":
    main()
