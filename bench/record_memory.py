"""The agent's peak memory on the record path (issue 18): big frames, and floods against a
server slower than the plugin.

Scenarios, each with a fresh agent (`python -m elkeid_agent run`, or `--exe PATH` for the
frozen build), compression `none`, one plugin, and a sink AgentCenter in a child process:

* `bigframes`: the plugin writes 60 records of the largest frame the agent accepts
  (`plugins.max_frame_bytes`, 8,322,032 bytes) as fast as the pipe takes them; the sink
  reads as fast as it can.
* `slow`: the plugin floods 300-byte records (bench/plugins.py's plugin) for `--seconds`;
  the sink reads at most `--read-rate` records/s (120,000 by default: a server that decodes
  every record), so the agent's buffer, the messages in flight and grpc's buffers fill.
* `fast`: the same flood, the sink reading as fast as it can.

Printed per scenario: the peak RSS of the agent's processes (plugins excluded) sampled every
20 ms, records written and delivered, the agent's heartbeat counters on backpressure.

    .venv/bin/python bench/record_memory.py [--exe PATH] [--only bigframes,slow,fast]
                                           [--seconds 20] [--read-rate 120000]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from plugins import PLUGIN, RECORD_BYTES, RECORD_MARK  # beside this file
from procstat import PLUGIN_CGROUP, agent_group, rss_bytes, start_sink  # beside this file

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

MIB = 2**20
#: plugins.max_frame_bytes' default (elkeid_agent.config).
MAX_FRAME = 8 * 1024 * 1024 - 64 * 1024 - 16
BIG_FRAMES = 60

# 60 records of exactly FRAME_BYTES (data_type 9999, one map entry holding the padding).
BIG_PLUGIN = r"""
import os
def varint(n):
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
def field(key, data):
    return bytes((key,)) + varint(len(data)) + data
def record(pad):
    entry = field(0x0A, field(0x0A, b"pad") + field(0x12, b"p" * pad))
    return b"\x08\x8fN" + field(0x1A, field(0x0A, entry))
size = int(os.environ["FRAME_BYTES"])
pad = size - 32
while len(record(pad)) != size:
    pad += size - len(record(pad))
body = record(pad)
frame = len(body).to_bytes(4, "little") + body
out = os.fdopen(4, "wb", buffering=0)
sent = 0
for _ in range(int(os.environ["FRAMES"])):
    out.write(frame)
    sent += 1
with open("sent.tmp", "w") as f:
    f.write(str(sent))
os.rename("sent.tmp", "sent")
os.read(3, 1)
"""


# --- the sink (child process) -------------------------------------------------------------------


async def sink(certs_dir: str, configs: list[dict[str, Any]], tally_file: str,
               read_rate: float, big: bool) -> None:
    import grpc

    from elkeid_agent._proto import grpc_pb2
    from elkeid_center.certs import ensure_certs
    from elkeid_center.server import SERVER_OPTIONS, ServerTls, configs_command, transfer_handler

    tls = ServerTls.from_certs(ensure_certs(certs_dir))
    command = configs_command(configs)
    state: dict[str, Any] = {"count": 0, "first": 0.0, "last": 0.0, "beat": {}, "max": {}}

    def save() -> None:
        tmp = tally_file + ".tmp"
        Path(tmp).write_text(json.dumps(state))
        os.replace(tmp, tally_file)

    async def transfer(requests: Any, context: Any) -> Any:
        pushed = False
        due = time.monotonic()
        async for raw in requests:
            message = grpc_pb2.PackagedData.FromString(raw)
            # The flood's records by their leading bytes (in C); big ones are few.
            n = (sum(1 for r in message.records if len(r.data) > MIB) if big
                 else raw.count(RECORD_MARK))
            for record in message.records:
                if record.data_type == 1000:
                    beat = dict(grpc_pb2.Payload.FromString(record.data).fields)
                    state["beat"] = beat
                    for key, value in beat.items():
                        if key.endswith("_bytes") and value.isdigit():
                            state["max"][key] = max(state["max"].get(key, 0), int(value))
            now = time.time()
            if n and not state["count"]:
                state["first"] = now
            state["count"] += n
            state["last"] = now
            save()
            if not pushed and any(r.data_type == 1000 for r in message.records):
                pushed = True
                yield command
            if read_rate:
                due = max(due, time.monotonic()) + len(message.records) / read_rate
                await asyncio.sleep(due - time.monotonic())

    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((transfer_handler(transfer),))
    port = server.add_secure_port("127.0.0.1:0", tls.credentials())
    await server.start()
    save()
    print(f"PORT {port}", flush=True)
    await server.wait_for_termination()


# --- the bench (this process) --------------------------------------------------------------------


class Sampler:
    """The largest RSS of the agent's processes, sampled every 20 ms in a thread; the group
    is looked up again every 0.5 s (a frozen build's processes are launchers and a child)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.group = self._group()
        self.peak = 0
        self.first = rss_bytes(self.group)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _group(self) -> list[Any]:
        return agent_group(self.pid, lambda c: "plugin.py" in c or c[:1] == ["/bin/sh"])

    def _run(self) -> None:
        looked = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - looked > 0.5:
                self.group, looked = self._group(), time.monotonic()
            self.peak = max(self.peak, rss_bytes(self.group))
            self._stop.wait(0.02)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run(name: str, script: str, detail: str, read_rate: float, agent_cmd: list[str],
        wait_seconds: float, extra: str = "") -> dict[str, Any]:
    from elkeid_center.agent_config import write_agent_config
    from elkeid_center.certs import ensure_certs

    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        base = Path(tmp)
        certs = ensure_certs(base / "certs")
        work = base / "work"
        plugin_dir = work / "plugin" / name
        plugin_dir.mkdir(parents=True)
        exe = plugin_dir / name
        (plugin_dir / "plugin.py").write_text(script)
        exe.write_text(f"#!/bin/sh\nexport $DETAIL RECORD_BYTES={RECORD_BYTES}\n"
                       f"exec '{sys.executable}' plugin.py\n")
        exe.chmod(0o755)
        sha256 = hashlib.sha256(exe.read_bytes()).hexdigest()
        configs = [{"name": name, "version": "1", "sha256": sha256, "detail": detail}]
        (base / "configs.json").write_text(json.dumps(configs))
        tally_file = base / "tally.json"
        sink_proc, address = start_sink(
            [sys.executable, __file__, "--sink", str(certs.directory),
             str(base / "configs.json"), str(tally_file), str(read_rate),
             "big" if script is BIG_PLUGIN else "mark"]
        )
        config = write_agent_config(base / "agent.toml", work, certs.directory,
                                    {"default": {"private": address}}, compression="none",
                                    plugin_cgroup=PLUGIN_CGROUP)
        config.write_text(config.read_text().replace(
            "[transport]", "[transport]\nheartbeat_interval = 1.0") + extra)
        agent = subprocess.Popen([*agent_cmd, "run", "--config", str(config)], cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)},
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            group: list[Any] = []
            while time.monotonic() < deadline:
                group = agent_group(agent.pid, lambda c: "plugin.py" in c)
                if len(agent_group(agent.pid, lambda c: False)) > len(group):
                    break
                time.sleep(0.02)
            else:
                raise SystemExit("the plugin did not start within 30 s")
            sampler = Sampler(agent.pid)
            sent_file = plugin_dir / "sent"
            deadline = time.monotonic() + wait_seconds
            while not sent_file.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            sent = int(sent_file.read_text()) if sent_file.exists() else -1
            settle = time.monotonic() + 120
            tally = json.loads(tally_file.read_text())
            while tally["count"] < sent and time.monotonic() < settle:
                time.sleep(0.1)
                tally = json.loads(tally_file.read_text())
            time.sleep(1.5)
            tally = json.loads(tally_file.read_text())
            peak = sampler.stop()
            alive = agent.poll() is None
        finally:
            agent.terminate()
            try:
                agent.wait(20)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
            sink_proc.kill()
            sink_proc.wait()
    beat = tally["beat"]
    return {
        "peak_mib": peak / MIB,
        "start_mib": sampler.first / MIB,
        "sent": sent,
        "delivered": tally["count"],
        "alive": alive,
        "max": tally["max"],
        "beat": {k: v for k, v in beat.items()
                 if k.startswith(("backpressure", "memory", "buffer", "inflight", "spool_bytes"))},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sink", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--exe", help="the frozen agent (default: python -m elkeid_agent)")
    parser.add_argument("--only", default="bigframes,slow,fast")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--read-rate", type=float, default=120_000.0)
    parser.add_argument("--toml", default="", help="TOML appended to the agent's config")
    args = parser.parse_args()
    if args.sink:
        certs_dir, configs, tally, rate, mode = args.sink
        asyncio.run(sink(certs_dir, json.loads(Path(configs).read_text()), tally, float(rate),
                         mode == "big"))
        return
    agent_cmd = [args.exe] if args.exe else [sys.executable, "-m", "elkeid_agent"]
    for name in args.only.split(","):
        if name == "bigframes":
            result = run("bench-big", BIG_PLUGIN, f"FRAME_BYTES={MAX_FRAME} FRAMES={BIG_FRAMES}",
                         0.0, agent_cmd, 120, args.toml)
        else:
            rate = args.read_rate if name == "slow" else 0.0
            result = run("bench-flood", PLUGIN, f"RATE=0 DURATION={args.seconds:g}", rate,
                         agent_cmd, args.seconds + 30, args.toml)
        print(f"{name:10} peak RSS {result['peak_mib']:6.1f} MiB (at start "
              f"{result['start_mib']:.1f})  sent {result['sent']:,} "
              f"delivered {result['delivered']:,} alive {result['alive']}  {result['beat']}\n"
              f"  largest in a heartbeat: {result['max']}",
              flush=True)


if __name__ == "__main__":
    main()
