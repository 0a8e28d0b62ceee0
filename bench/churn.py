"""Churn benchmark (issue 10): does the agent's memory stay flat while the center restarts?

A center in a child process (this file with `--center`) serves Transfer on a fixed port,
pushes the plugin's Config on each stream's first heartbeat (as the real AgentCenter does)
and counts the plugin's records by their `seq`. The real agent (`python -m elkeid_agent run`,
compression `none`, reconnect backoff capped at 1 s so a restart costs seconds, not minutes)
runs one plugin, `bench-churn`, that writes 3,000 records/s the way the plugin libraries do:
one 300-byte Record at a time into a 512 KiB buffered writer that is flushed every 200 ms.

The center is restarted N times: its gRPC server stops (every stream breaks), stays down for
`--pause` seconds and comes back on the same port. After each reconnect the stream runs for
`--session` seconds, then the bench samples the agent's processes (plugins excluded): VmRSS,
RssAnon, open fds and threads.

Printed: the curve (one line per 10 restarts, min/max), the RSS growth (median of restarts
10-19 against the median of the last ten) against the 2 MiB target, the agent's CPU and minor
page faults, where the resident anonymous memory is (main heap, other mappings, stacks) at
restart 10, at the end and after the agent's SIGUSR2 (gc + malloc_trim), and records written
by the plugin vs distinct records delivered (after the plugin stops and the agent had 20 s to
drain).

`--tracemalloc` runs the agent under tracemalloc (a wrapper in this file, not the product)
and prints the 15 largest allocation differences between restart 10 and the last one.

    .venv/bin/python bench/churn.py [--restarts 100] [--pause 0.5] [--session 2] [--tracemalloc]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

from benchplugin import FRAME_CODE  # beside this file
from procstat import PLUGIN_CGROUP, agent_group  # beside this file

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

RATE = 3000
TARGET_MIB = 2.0
WARMUP_RESTARTS = 10

# One record per write() into a 512 KiB BufferedWriter, flushed every 200 ms (the Go and
# Rust plugin libraries' buffer size and flush timer). Runs until the file `stop` appears.
PLUGIN = FRAME_CODE + r"""
import os, time
rate = float(os.environ["RATE"])
out = open(4, "wb", buffering=512 * 1024, closefd=False)
sent = 0
began = last_flush = time.monotonic()
while True:
    now = time.monotonic()
    due = int((now - began) * rate)
    while sent < due:
        out.write(head + b"%010d" % sent + tail)
        sent += 1
    if now - last_flush >= 0.2:
        out.flush()
        last_flush = now
        if os.path.exists("stop"):
            break
    time.sleep(0.01)
out.flush()
with open("sent.tmp", "w") as f:
    f.write(str(sent))
os.rename("sent.tmp", "sent")
os.read(3, 1)  # stay up until the agent closes the task pipe
"""

# The agent under tracemalloc: `--traced-agent DIR ARGS...` starts tracing, then runs the
# agent's own __main__ with ARGS; a file DIR/dump-NAME makes it write DIR/NAME.snapshot.
TRACE_FRAMES = 20


def traced_agent(directory: str, argv: list[str]) -> None:
    import runpy
    import tracemalloc

    tracemalloc.start(TRACE_FRAMES)
    base = Path(directory)

    def watch() -> None:
        while True:
            for request in base.glob("dump-*"):
                name = request.name.removeprefix("dump-")
                snapshot = tracemalloc.take_snapshot()
                tmp = base / f"{name}.tmp"
                snapshot.dump(str(tmp))
                os.replace(tmp, base / f"{name}.snapshot")
                request.unlink()
            time.sleep(0.2)

    threading.Thread(target=watch, name="churn-trace", daemon=True).start()
    sys.argv = ["elkeid_agent", *argv]
    runpy.run_module("elkeid_agent", run_name="__main__", alter_sys=True)


# --- the center (child process) ------------------------------------------------------------------


class Tally:
    """Records of type 9999 received, and which distinct `seq`s (a growing bitmap)."""

    def __init__(self) -> None:
        self.received = 0
        self.distinct = 0
        self.seen = bytearray()

    def add(self, data: bytes) -> None:
        at = data.find(b"seq\x12\x0a")
        if at < 0:
            return
        seq = int(data[at + 5 : at + 15])
        self.received += 1
        byte, bit = divmod(seq, 8)
        if byte >= len(self.seen):
            self.seen.extend(bytes(byte + 1 - len(self.seen) + 65536))
        if not self.seen[byte] & (1 << bit):
            self.seen[byte] |= 1 << bit
            self.distinct += 1


async def center(certs_dir: str, configs: list[dict[str, Any]]) -> None:
    import grpc

    from elkeid_agent._proto import grpc_pb2
    from elkeid_center.certs import ensure_certs
    from elkeid_center.server import SERVER_OPTIONS, ServerTls, configs_command, transfer_handler

    tls = ServerTls.from_certs(ensure_certs(certs_dir))
    command = configs_command(configs)
    tally = Tally()
    streams = 0

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    async def transfer(requests: Any, context: Any) -> Any:
        nonlocal streams
        pushed = False
        async for raw in requests:
            message = grpc_pb2.PackagedData.FromString(raw)
            for record in message.records:
                if record.data_type == 9999:
                    tally.add(record.data)
            if not pushed and any(r.data_type == 1000 for r in message.records):
                pushed = True
                streams += 1
                say(f"CONNECTED {streams}")
                yield command

    async def serve(port: int) -> Any:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        server.add_generic_rpc_handlers((transfer_handler(transfer),))
        bound = server.add_secure_port(f"127.0.0.1:{port}", tls.credentials())
        if not bound:
            raise SystemExit(f"cannot bind 127.0.0.1:{port}")
        await server.start()
        return server, bound

    server, port = await serve(0)
    say(f"PORT {port}")
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        words = line.split()
        if not words or words[0] == "quit":
            await server.stop(0)
            return
        if words[0] == "restart":
            await server.stop(0)
            await asyncio.sleep(float(words[1]))
            server, _ = await serve(port)
            say("UP")
        elif words[0] == "tally":
            say(f"TALLY {tally.received} {tally.distinct}")


# --- the bench (this process) --------------------------------------------------------------------


@dataclass
class Sample:
    restart: int
    rss: int
    anon: int
    fds: int
    threads: int


def cpu_and_faults(group: list[Any]) -> tuple[float, int]:
    """CPU seconds (user + system) and minor page faults of the agent processes."""
    cpu, faults = 0.0, 0
    for proc in group:
        with open(f"/proc/{proc.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        faults += int(fields[7])
        cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return cpu, faults


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def sample(restart: int, group: list[Any]) -> Sample:
    rss = anon = fds = threads = 0
    for proc in group:
        rss += status_kib(proc.pid, "VmRSS") * 1024
        anon += status_kib(proc.pid, "RssAnon") * 1024
        fds += proc.num_fds()
        threads += proc.num_threads()
    return Sample(restart, rss, anon, fds, threads)


def anon_map(group: list[Any]) -> dict[str, int]:
    """Resident anonymous memory by kind: the main heap (brk), 64 MiB-aligned malloc arenas
    of other threads and large mmap'd blocks (anonymous mappings), thread stacks."""
    out = {"heap": 0, "mmap": 0, "stack": 0}
    for proc in group:
        kind = ""
        with open(f"/proc/{proc.pid}/smaps") as f:
            for line in f:
                head = line.split(maxsplit=6)
                if "-" in head[0] and len(head) >= 5:
                    path = head[5].strip() if len(head) > 5 else ""
                    kind = (
                        "heap" if path == "[heap]"
                        else "stack" if path.startswith("[stack")
                        else "mmap" if not path
                        else ""
                    )
                elif kind and head[0] == "Rss:":
                    out[kind] += int(head[1]) * 1024
    return out


def show_map(label: str, group: list[Any]) -> None:
    parts = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in anon_map(group).items())
    print(f"  {label}: anonymous resident MiB: {parts}", flush=True)


class Center:
    def __init__(self, certs: Path, configs: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--center", str(certs), str(configs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.expect("PORT")
        self.address = f"127.0.0.1:{int(line.split()[1])}"

    def expect(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit(f"the center exited while waiting for {prefix}")
            if line.startswith(prefix):
                return line

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def tally(self) -> tuple[int, int]:
        self.send("tally")
        _, received, distinct = self.expect("TALLY").split()
        return int(received), int(distinct)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send("quit")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def tracemalloc_diff(trace_dir: Path, first: str, last: str) -> None:
    import tracemalloc

    old = tracemalloc.Snapshot.load(str(trace_dir / f"{first}.snapshot"))
    new = tracemalloc.Snapshot.load(str(trace_dir / f"{last}.snapshot"))
    print(f"tracemalloc: traced {sum(s.size for s in old.statistics('filename')) / 2**20:.2f} "
          f"-> {sum(s.size for s in new.statistics('filename')) / 2**20:.2f} MiB; "
          f"top differences, restart {first} -> {last}:")
    for stat in new.compare_to(old, "traceback")[:15]:
        print(f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks")
        for line in stat.traceback.format(limit=6):
            print("      " + line)


def request_snapshot(trace_dir: Path, name: str) -> None:
    (trace_dir / f"dump-{name}").touch()
    deadline = time.monotonic() + 60
    while not (trace_dir / f"{name}.snapshot").exists():
        if time.monotonic() > deadline:
            raise SystemExit("the traced agent wrote no snapshot within 60 s")
        time.sleep(0.1)


def bench(args: argparse.Namespace) -> None:
    import psutil

    from elkeid_center.agent_config import write_agent_config
    from elkeid_center.certs import ensure_certs

    tmp = tempfile.TemporaryDirectory(prefix="bench-churn-")
    base = Path(tmp.name)
    certs = ensure_certs(base / "certs")
    work = base / "work"
    name = "bench-churn"
    plugin_dir = work / "plugin" / name
    plugin_dir.mkdir(parents=True)
    (plugin_dir / "plugin.py").write_text(PLUGIN)
    exe = plugin_dir / name
    exe.write_text(f"#!/bin/sh\nexport $DETAIL\nexec '{sys.executable}' plugin.py\n")
    exe.chmod(0o755)
    sha256 = hashlib.sha256(exe.read_bytes()).hexdigest()
    configs = base / "configs.json"
    configs.write_text(
        json.dumps([{"name": name, "version": "1", "sha256": sha256, "detail": f"RATE={RATE}"}])
    )
    trace_dir = base / "trace"
    trace_dir.mkdir()
    center = Center(certs.directory, configs)
    agent: subprocess.Popen[bytes] | None = None
    try:
        config = write_agent_config(
            base / "agent.toml", work, certs.directory, {"default": {"private": center.address}},
            compression="none", plugin_cgroup=PLUGIN_CGROUP,
        )
        # Reconnect within a second: the bench measures churn, not the production backoff.
        text = config.read_text().replace(
            'compression = "none"',
            'compression = "none"\nbackoff_initial = 0.3\nbackoff_max = 1.0',
        )
        config.write_text(text)
        run = ["run", "--config", str(config)]
        cmd = (
            [sys.executable, __file__, "--traced-agent", str(trace_dir), *run]
            if args.tracemalloc
            else [*args.agent.split(), *run]
        )
        agent = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        center.expect("CONNECTED")
        deadline = time.monotonic() + 30
        while not (plugin_dir / f"{name}.stderr").exists():
            if time.monotonic() > deadline or agent.poll() is not None:
                raise SystemExit("the agent did not start the plugin within 30 s")
            time.sleep(0.05)
        import psutil

        cmdline = psutil.Process(agent.pid).cmdline()  # a frozen agent's launchers share it
        group = agent_group(agent.pid, lambda c: c != cmdline)
        print(
            f"bench/churn.py: {args.restarts} restarts (down {args.pause:g} s, then "
            f"{args.session:g} s streaming), plugin {RATE:,} rec/s one write each, 512 KiB "
            f"buffer flushed every 200 ms; agent: {' '.join(cmd[:3])}",
            flush=True,
        )
        time.sleep(args.session)
        samples = [sample(0, group)]
        cpu0, faults0 = cpu_and_faults(group)
        began = time.monotonic()
        print(f"{'restart':>7} {'RSS MiB':>8} {'anon MiB':>8} {'fds':>4} {'threads':>7}")
        show(samples[0])
        for n in range(1, args.restarts + 1):
            center.send(f"restart {args.pause}")
            center.expect("UP")
            center.expect("CONNECTED")
            time.sleep(args.session)
            if agent.poll() is not None:
                raise SystemExit(f"the agent exited ({agent.returncode}) at restart {n}")
            s = sample(n, group)
            samples.append(s)
            if n % 10 == 0 or n == args.restarts:
                show(s)
            if n in (WARMUP_RESTARTS, args.restarts):
                show_map(f"restart {n}", group)
            if args.tracemalloc and n in (WARMUP_RESTARTS, args.restarts):
                request_snapshot(trace_dir, str(n))
        cpu1, faults1 = cpu_and_faults(group)
        wall = time.monotonic() - began
        (plugin_dir / "stop").touch()
        deadline = time.monotonic() + 30
        while not (plugin_dir / "sent").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        sent = int((plugin_dir / "sent").read_text()) if (plugin_dir / "sent").exists() else -1
        settle = time.monotonic() + 20
        received, distinct = center.tally()
        while distinct < sent and time.monotonic() < settle:
            time.sleep(0.2)
            received, distinct = center.tally()
        summary(samples, args.restarts)
        print(
            f"agent over the restarts: {100 * (cpu1 - cpu0) / wall:.2f} % of one core "
            f"(machine-load sensitive), {(faults1 - faults0) / wall:,.0f} minor page faults/s"
        )
        # The agent's SIGUSR2: gc.collect() and malloc_trim(0). What it gives back was free
        # heap the allocator kept; what stays is live.
        agent.send_signal(signal.SIGUSR2)
        time.sleep(1)
        trimmed = sample(args.restarts, group)
        print(
            f"after SIGUSR2 (gc + malloc_trim): RSS {trimmed.rss / 2**20:.1f} MiB, "
            f"anon {trimmed.anon / 2**20:.1f} MiB"
        )
        show_map("after SIGUSR2", group)
        print(
            f"records: written {sent:,}, delivered {distinct:,} distinct "
            f"({received - distinct:,} duplicates), lost {sent - distinct:,}"
        )
        if args.tracemalloc and args.restarts > WARMUP_RESTARTS:
            tracemalloc_diff(trace_dir, str(WARMUP_RESTARTS), str(args.restarts))
    finally:
        if agent is not None and agent.poll() is None:
            agent.terminate()
            try:
                agent.wait(20)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        center.close()
        tmp.cleanup()


def show(s: Sample) -> None:
    print(
        f"{s.restart:>7} {s.rss / 2**20:>8.1f} {s.anon / 2**20:>8.1f} {s.fds:>4} {s.threads:>7}",
        flush=True,
    )


def summary(samples: list[Sample], restarts: int) -> None:
    def span(values: list[float]) -> str:
        return f"{min(values):.0f}..{max(values):.0f}"

    rss = [s.rss / 2**20 for s in samples]
    print(
        f"min/max: RSS {min(rss):.1f}/{max(rss):.1f} MiB, "
        f"anon {min(s.anon for s in samples) / 2**20:.1f}/"
        f"{max(s.anon for s in samples) / 2**20:.1f} MiB, "
        f"fds {span([s.fds for s in samples])}, threads {span([s.threads for s in samples])}"
    )
    if restarts <= WARMUP_RESTARTS:
        print(f"growth: needs more than {WARMUP_RESTARTS} restarts")
        return
    # One sample moves by a few hundred KiB with what is in flight: compare the medians of
    # restarts 10-19 and of the last ten.
    after = [s for s in samples if s.restart >= WARMUP_RESTARTS]
    first, last = after[:10], after[-10:]
    growth = (median([s.rss for s in last]) - median([s.rss for s in first])) / 2**20
    anon = (median([s.anon for s in last]) - median([s.anon for s in first])) / 2**20
    peak = (max(s.rss for s in after) - median([s.rss for s in first])) / 2**20
    verdict = "holds" if growth <= TARGET_MIB else "FAILS"
    print(
        f"growth, median of restarts {first[0].restart}-{first[-1].restart} -> median of "
        f"{last[0].restart}-{last[-1].restart}: RSS {growth:+.2f} MiB, anon {anon:+.2f} MiB "
        f"(highest sample {peak:+.2f}); target <= {TARGET_MIB:g} MiB: {verdict}"
    )


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--traced-agent":
        traced_agent(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--center", nargs=2, metavar=("CERTS", "CONFIGS"))
    parser.add_argument("--restarts", type=int, default=100)
    parser.add_argument("--pause", type=float, default=0.5, help="seconds the server is down")
    parser.add_argument("--session", type=float, default=2.0, help="seconds streamed per restart")
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument(
        "--agent",
        default=f"{sys.executable} -m elkeid_agent",
        help="command that starts the agent (e.g. a frozen build's path)",
    )
    args = parser.parse_args()
    if args.center:
        import uvloop

        certs_dir, configs_file = args.center
        uvloop.run(center(certs_dir, json.loads(Path(configs_file).read_text())))
        return
    bench(args)


if __name__ == "__main__":
    main()
