"""Outage benchmark (issue 11): records through a server outage and an agent restart.

A plugin (tests/plugins/bin/numbered.py) numbers its records (`run` = its pid, `seq`) at
--rate records/s, written as the Go and Rust libraries write them: one record at a time into a
512 KiB buffer flushed every 200 ms. A sink AgentCenter (this file with `--sink`, a child
process) counts unique (run, seq) pairs and duplicates; SIGUSR1 takes its gRPC server down
(the outage), SIGUSR2 brings it back on the same port.

Each run: the agent runs connected for a few seconds, the sink goes down for --outage
seconds, half-way through the agent is restarted (SIGTERM, or SIGKILL), the sink comes back,
the backlog drains, then the agent is stopped with SIGTERM (its plugin first, so the plugin's
last count is saved) and the books are closed. Printed per run:
* produced: records the plugin processes generated (each saves its count after every flush),
* delivered: unique records the sink received; duplicates: received more than once,
* lost: produced - delivered (what is left in the spool at the end is shown apart),
* drain: seconds from the sink's return to the first heartbeat reporting an empty spool and
  less than a second of records in memory,
* plugin back: seconds from the new agent's start to its plugin's first count (no server),
* written/rec: bytes the agent processes caused to be written to disk (/proc/PID/io
  write_bytes, logs and status file included) per record produced.
`baseline` is the same SIGTERM run with `[spool] enabled = false`.

`upgrade`: the agent upgrades itself from A to B during the outage. It runs as
`<work_dir>/elkeid-agent` outside any package, a stand-in for version A built from the source
tree (tests/upgrade/upgradetools.py, as tests/upgrade/test_process.py does), restarted by this
bench whenever it exits (the service manager's part). Just before the sink goes down it sends
the upgrade Config (version B, its sha256, a URL on a local HTTP file server); the sink goes
down as soon as the download starts, so the download, both probes, the swap, A's exit and B's
start all happen with no server. "plugin back" is counted from B's start.

`drain` prefills the spool with --drain-minutes of a --rate host and times its delivery.

    .venv/bin/python bench/outage.py [--outage 60] [--rate 5000] [--only baseline,sigterm,...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from procstat import PLUGIN_CGROUP, start_sink  # beside this file

ROOT = Path(__file__).resolve().parent.parent
for extra in (ROOT, ROOT / "tests", ROOT / "tests" / "upgrade"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

NUMBERED = ROOT / "tests" / "plugins" / "bin" / "numbered.py"
RUN_SEQ = re.compile(rb"\x0a\x03run\x12.([0-9]+)\x0a.\x0a\x03seq\x12.([0-9]+)", re.S)


# --- the sink (child process) -------------------------------------------------------------------


def read_json(path: str) -> Any:
    return json.loads(Path(path).read_text())


def write_json(path: str, value: Any) -> None:
    tmp = path + ".tmp"
    Path(tmp).write_text(json.dumps(value))
    os.replace(tmp, path)


async def sink(certs_dir: str, configs_file: str, tally_file: str) -> None:
    import asyncio

    import grpc

    from elkeid_agent._proto import grpc_pb2
    from elkeid_center.certs import ensure_certs
    from elkeid_center.server import SERVER_OPTIONS, ServerTls, configs_command, transfer_handler

    tls = ServerTls.from_certs(ensure_certs(certs_dir))
    command = configs_command(read_json(configs_file))
    pushes = 0  # SIGHUP: the configs file again, pushed on every stream's next heartbeat
    seen: dict[bytes, bytearray] = {}
    state: dict[str, Any] = {"unique": 0, "duplicates": 0, "top": {}, "beat": {}, "beat_at": 0.0,
                             "version": ""}

    def note(run: bytes, seq: int) -> None:
        bits = seen.setdefault(run, bytearray())
        if seq >= len(bits):
            bits.extend(bytes(seq + 65536 - len(bits)))
        if bits[seq]:
            state["duplicates"] += 1
        else:
            bits[seq] = 1
            state["unique"] += 1
            top = state["top"]
            top[run.decode()] = max(top.get(run.decode(), 0), seq + 1)

    async def transfer(requests: Any, context: Any) -> Any:
        pushed = -1
        async for raw in requests:
            # One C-level regex pass over the message instead of decoding every record.
            for run, seq in RUN_SEQ.findall(raw):
                note(run, int(seq))
            if b"spool_records" not in raw:
                continue
            message = grpc_pb2.PackagedData.FromString(raw)
            for rec in message.records:
                if rec.data_type == 1000:
                    state["beat"] = dict(grpc_pb2.Payload.FromString(rec.data).fields)
                    state["beat_at"] = time.time()
                    state["version"] = message.version
                    if pushed < pushes:
                        pushed = pushes
                        yield command

    def reload() -> None:
        nonlocal command, pushes
        command = configs_command(read_json(configs_file))
        pushes += 1

    async def save_loop() -> None:
        while True:
            write_json(tally_file, state)
            await asyncio.sleep(0.2)

    port = 0
    server: Any = None

    async def start() -> None:
        nonlocal server, port
        server = grpc.aio.server(options=SERVER_OPTIONS)
        server.add_generic_rpc_handlers((transfer_handler(transfer),))
        port = server.add_secure_port(f"127.0.0.1:{port}", tls.credentials())
        await server.start()

    await start()
    print(f"PORT {port}", flush=True)
    loop = asyncio.get_running_loop()
    wanted: asyncio.Queue[str] = asyncio.Queue()
    loop.add_signal_handler(signal.SIGUSR1, wanted.put_nowait, "stop")
    loop.add_signal_handler(signal.SIGUSR2, wanted.put_nowait, "start")
    loop.add_signal_handler(signal.SIGHUP, reload)
    saver = asyncio.create_task(save_loop())
    try:
        while True:
            if await wanted.get() == "stop":
                await server.stop(0)
            else:
                await start()
    finally:
        saver.cancel()


# --- the bench (this process) --------------------------------------------------------------------


class IoWatch:
    """Polls /proc/PID/io of the agents started so far; the sum of their write_bytes."""

    def __init__(self) -> None:
        self.last: dict[int, int] = {}
        self.pids: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def watch(self, pid: int) -> None:
        self.pids.append(pid)

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            for pid in list(self.pids):
                try:
                    text = Path(f"/proc/{pid}/io").read_text()
                except OSError:
                    continue
                for line in text.splitlines():
                    if line.startswith("write_bytes:"):
                        self.last[pid] = int(line.split()[1])

    def total(self) -> int:
        self._stop.set()
        self._thread.join()
        return sum(self.last.values())


class Setup:
    """A sink, an agent config and the numbered plugin installed in a temporary work dir."""

    def __init__(self, rate: int, spool: dict[str, Any]) -> None:
        from agentproc import patch_config

        from elkeid_center.agent_config import write_agent_config
        from elkeid_center.certs import ensure_certs

        self._tmp = tempfile.TemporaryDirectory(prefix="bench-outage-")
        self.base = base = Path(self._tmp.name)
        certs = ensure_certs(base / "certs")
        self.work = base / "work"
        self.counts = base / "counts"
        self.counts.mkdir()
        plugin_dir = self.work / "plugin" / "numbered"
        plugin_dir.mkdir(parents=True)
        exe = plugin_dir / "numbered"
        exe.write_text(
            f"#!/bin/sh\nexport RATE='{rate}' COUNT_DIR='{self.counts}' PYTHONPATH='{ROOT}'\n"
            f"exec '{sys.executable}' '{NUMBERED}'\n"
        )
        exe.chmod(0o755)
        import hashlib

        sha256 = hashlib.sha256(exe.read_bytes()).hexdigest()
        self.configs: list[dict[str, Any]] = [
            {"name": "numbered", "version": "1", "sha256": sha256}
        ]
        self.configs_file = base / "configs.json"
        self.configs_file.write_text(json.dumps(self.configs))
        self.tally_file = base / "tally.json"
        self.sink, address = start_sink(
            [sys.executable, __file__, "--sink", str(certs.directory),
             str(base / "configs.json"), str(self.tally_file)]
        )
        self.config = write_agent_config(
            base / "agent.toml", self.work, certs.directory, {"default": {"private": address}},
            compression="none", plugin_cgroup=PLUGIN_CGROUP,
        )
        patch_config(
            self.config,
            transport={"heartbeat_interval": 1.0, "dial_timeout": 1.0, "backoff_max": 2.0},
            spool={"min_free_bytes": 0, **spool},
        )
        self.io = IoWatch()

    def start_agent(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "elkeid_agent", "run", "--config", str(self.config)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.io.watch(proc.pid)
        return proc

    def tally(self) -> dict[str, Any]:
        while True:
            try:
                result: dict[str, Any] = json.loads(self.tally_file.read_text())
                return result
            except (OSError, ValueError):
                time.sleep(0.05)

    def produced(self) -> dict[str, int]:
        return {p.name: int(p.read_text() or 0) for p in self.counts.iterdir() if p.name.isdigit()}

    def spool_left(self) -> int:
        """Records still held in the spool (after its checkpoint) once the agent has exited."""
        import asyncio

        from elkeid_agent.config import SpoolConfig
        from elkeid_agent.health import Health
        from elkeid_agent.spool.store import Spool

        async def held() -> int:
            spool = Spool(self.work, SpoolConfig(min_free_bytes=0), Health())
            await spool.open()
            return spool.records

        return asyncio.run(held())

    def close(self) -> None:
        self.sink.kill()
        self.sink.wait()
        self._tmp.cleanup()


def wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


class SelfUpgrade:
    """Versions A and B of the agent as tests/upgrade builds them (the source tree run as "A"
    or "B"), B served over HTTP, and the service manager's part: start `<work_dir>/elkeid-agent`
    again when it exits."""

    def __init__(self, setup: Setup, stack: contextlib.ExitStack) -> None:
        from upgradetools import Service, http_files, sha, standin

        self.setup = setup
        runner = setup.base / "runner"
        exe = setup.work / "elkeid-agent"
        exe.write_bytes(standin(runner, "A"))
        exe.chmod(0o700)
        self.b = standin(runner, "B")
        self.hits: list[str] = []
        url = stack.enter_context(http_files({"/b": self.b}, hits=self.hits)) + "/b"
        self.config = {"name": "elkeid-agent", "version": "B", "sha256": sha(self.b),
                       "download_urls": [url]}
        self.service = Service(setup.work, setup.config, {})

    def start(self) -> subprocess.Popen[bytes]:
        proc = self.service.start().proc
        assert proc is not None
        self.setup.io.watch(proc.pid)
        return proc

    def push(self) -> None:
        """The sink sends the upgrade Config; returns once A has begun to download B."""
        self.setup.configs_file.write_text(json.dumps([*self.setup.configs, self.config]))
        self.setup.sink.send_signal(signal.SIGHUP)
        wait(lambda: self.hits, 30, "A to download B")

    def swapped(self) -> None:
        """Waits for A to exit on its own after the swap."""
        code = self.service.wait(120)
        if code != 0 or (self.setup.work / "elkeid-agent").read_bytes() != self.b:
            raise SystemExit(f"A exited with {code} without swapping in B; see "
                             f"{self.setup.work}/log")


def outage_run(mode: str, rate: int, outage: float) -> dict[str, Any]:
    setup = Setup(rate, {"enabled": mode != "baseline"})
    with contextlib.ExitStack() as stack:
        stack.callback(setup.close)
        upgrade = SelfUpgrade(setup, stack) if mode == "upgrade" else None
        agent = upgrade.start() if upgrade else setup.start_agent()
        wait(lambda: setup.tally()["unique"] > rate, 60, "the first records")
        time.sleep(3)
        if upgrade:
            upgrade.push()
        setup.sink.send_signal(signal.SIGUSR1)
        began = time.monotonic()
        if upgrade:
            upgrade.swapped()
        else:
            time.sleep(outage / 2)
            agent.send_signal(signal.SIGKILL if mode == "sigkill" else signal.SIGTERM)
            agent.wait(30)
        restarted = time.monotonic() - began
        runs = set(setup.produced())
        agent = upgrade.start() if upgrade else setup.start_agent()
        started = time.monotonic()
        wait(lambda: set(setup.produced()) - runs, 60, "the plugin after the restart")
        plugin_back = time.monotonic() - started
        time.sleep(max(0.0, began + outage - time.monotonic()))
        setup.sink.send_signal(signal.SIGUSR2)
        back = time.time()

        def drained() -> float | None:
            t = setup.tally()
            beat = t["beat"]
            if t["beat_at"] <= back + 0.5 or not beat:
                return None
            caught_up = int(beat.get("spool_records", "0")) == 0
            if caught_up and int(beat.get("buffer_records", "0")) < rate:
                return float(t["beat_at"] - back)
            return None

        drain = wait(drained, 600, "the backlog to drain")
        time.sleep(2)
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)
        time.sleep(0.5)
        tally = setup.tally()
        made = setup.produced()
        for run, top in tally["top"].items():
            made[run] = max(made.get(run, 0), top)
        produced = sum(made.values())
        written = setup.io.total()
        left = setup.spool_left()
    return {
        "produced": produced,
        "delivered": tally["unique"],
        "duplicates": tally["duplicates"],
        "lost": produced - tally["unique"] - left,
        "left": left,
        "drain": drain,
        "restarted": restarted,
        "plugin_back": plugin_back,
        "written_per_record": written / max(produced, 1),
        "version": tally["version"],
        "upgrade_state": tally["beat"].get("upgrade_state", ""),
    }


def drain_run(rate: int, minutes: float) -> dict[str, Any]:
    """A spool prefilled with `minutes` of a `rate` host; seconds until all of it arrived."""
    from elkeid_agent.spool import format as fmt
    from elkeid_agent.wire import splice_records
    from elkeid_plugin_sdk.client import encode_record

    total = int(rate * minutes * 60)
    setup = Setup(rate, {"max_bytes": 4 * 1024**3})
    try:
        spool = setup.work / "spool"
        spool.mkdir(parents=True)
        pad = "p" * 200
        per_entry = 3000
        template = [
            encode_record(9999, int(time.time()), {"run": "1", "seq": f"{i:010d}", "pad": pad})
            for i in range(per_entry)
        ]
        now = int(time.time())
        segment, size, out = 1, 0, (spool / fmt.segment_name(1)).open("wb")
        for start in range(0, total, per_entry):
            n = min(per_entry, total - start)
            records = [r.replace(b"%010d" % i, b"%010d" % (start + i), 1)
                       for i, r in enumerate(template[:n])]
            entry = fmt.encode_entry(2, n, now, splice_records(records, b""))
            if size > 16 * 1024 * 1024:
                out.close()
                segment, size = segment + 1, 0
                out = (spool / fmt.segment_name(segment)).open("wb")
            out.write(entry)
            size += len(entry)
        out.close()
        # No live plugin here: only the backlog is timed.
        (setup.work / "plugin" / "numbered" / "numbered").write_text("#!/bin/sh\nexec cat <&3\n")
        import psutil

        began = time.monotonic()
        agent = setup.start_agent()
        wait(lambda: setup.tally()["unique"] > 0, 120, "the first record")
        first = time.monotonic() - began
        wait(lambda: setup.tally()["unique"] >= total, 900, "the prefilled backlog")
        seconds = time.monotonic() - began
        cpu = psutil.Process(agent.pid).cpu_times()
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)
        duplicates = setup.tally()["duplicates"]
    finally:
        setup.close()
    return {"records": total, "seconds": seconds, "first": first, "duplicates": duplicates,
            "cpu": cpu.user + cpu.system}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sink", nargs=3, metavar=("CERTS", "CONFIGS", "TALLY"))
    parser.add_argument("--outage", type=float, default=60.0)
    parser.add_argument("--rate", type=int, default=5000)
    parser.add_argument("--drain-minutes", type=float, default=5.0)
    parser.add_argument("--only", default="baseline,sigterm,sigkill,upgrade,drain")
    args = parser.parse_args()
    if args.sink:
        import uvloop

        uvloop.run(sink(*args.sink))
        return
    print(f"bench/outage.py: {args.rate} records/s, outage {args.outage:g} s, "
          f"agent restarted half-way (upgrade: once B is swapped in), {os.cpu_count()} CPUs")
    for name in args.only.split(","):
        if name == "drain":
            d = drain_run(args.rate, args.drain_minutes)
            print(f"drain     {d['records']:,} spooled records ({args.drain_minutes:g} min at "
                  f"{args.rate}/s) delivered in {d['seconds']:.1f} s "
                  f"from the agent's start, the first after {d['first']:.1f} s "
                  f"({d['records'] / (d['seconds'] - d['first']):,.0f}/s), agent CPU "
                  f"{d['cpu']:.1f} s, duplicates {d['duplicates']}   target <= 30 s", flush=True)
            continue
        r = outage_run(name, args.rate, args.outage)
        lost_pct = 100 * r["lost"] / r["produced"]
        print(
            f"{name:<9} produced {r['produced']:>9,}  delivered {r['delivered']:>9,}  "
            f"dup {r['duplicates']:>6,}  lost {r['lost']:>7,} ({lost_pct:5.2f} %)"
            f"  left {r['left']:,}  drain {r['drain']:5.1f} s"
            f"  plugin back {r['plugin_back']:4.1f} s"
            f"  written {r['written_per_record']:6.1f} B/rec",
            flush=True,
        )
        if name == "upgrade":
            print(f"{'':<9} A exited {r['restarted']:.1f} s into the outage (download, probes, "
                  f"swap); at the end: version {r['version']}, upgrade {r['upgrade_state']}",
                  flush=True)


if __name__ == "__main__":
    main()
