"""Side by side with the real Go agent: CPU, RSS and delivery at idle, 5,000, 20,000 rec/s, flood.

Both agents run one after the other against the same sink AgentCenter (127.0.0.1:6751, the PKI
of ../shared/go-agent/certs, compression none), with the same plugin: `go-plugin-loadgen`, built
on the real Elkeid Go plugin library (one `SendRecord` per record into a 512 KiB buffered writer
flushed every 200 ms), driven through the Config's `detail` (`RATE=… DURATION=…`). Agents
alternate within each scenario (A B … B A), so drift on the machine hits both.

Each run has a warm-up (12 s by default, the same for both agents: start-up is not the steady
state a fleet pays for) before its window. Printed per scenario and agent: CPU % of one core
(every agent process: the frozen build's launcher parents too; the plugin excluded) over the
window, the largest RSS sampled in it, the private part of the RSS at the window's end (USS:
pages no other process maps; `python -m` shares libpython, libcrypto and libc with the bench's
own Python processes, and the kernel pages out only private pages), records delivered per
second, and records lost (what the plugin reports it sent minus what the sink counted after a
settle time); then ours / Go.

    .venv/bin/python bench/vs_go.py [--seconds 20] [--warmup 12] [--repeats 1]
        [--only idle,5000,20000,flood] [--go-dir ../shared/go-agent]
        [--frozen dist/elkeid-agent-…-linux-amd64 | --no-frozen]

Exits 0 with a message when the Go agent is not there (a clone without ../shared).
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import importlib.util
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from procstat import (  # beside this file
    PLUGIN_CGROUP,
    agent_group,
    cpu_seconds,
    private_bytes,
    rss_bytes,
)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

PORT = 6751  # the only address the Go agent build dials
PLUGIN = "go-plugin-loadgen"
SETTLE_SECONDS = 15.0
SENT_RE = re.compile(rb"sent (\d+) records")


# --- the sink (child process) -------------------------------------------------------------------


async def sink(certs: Path, configs: list[dict[str, Any]], tally_file: str) -> None:
    import grpc

    from elkeid_agent._proto import grpc_pb2
    from elkeid_center.server import SERVER_OPTIONS, configs_command, transfer_handler

    command = configs_command(configs)
    state = {"count": 0, "first": 0.0, "last": 0.0, "streams": 0}

    def save() -> None:
        tmp = tally_file + ".tmp"
        Path(tmp).write_text(json.dumps(state))
        os.replace(tmp, tally_file)

    async def transfer(requests: Any, context: Any) -> Any:
        state["streams"] += 1
        pushed = False
        async for raw in requests:
            message = grpc_pb2.PackagedData.FromString(raw)
            n = sum(1 for r in message.records if r.data_type == 9999)
            if n:
                now = time.time()
                if not state["count"]:
                    state["first"] = now
                state["count"] += n
                state["last"] = now
                save()
            if not pushed:
                pushed = True
                yield command

    credentials = grpc.ssl_server_credentials(
        [((certs / "server.key").read_bytes(), (certs / "server.crt").read_bytes())],
        root_certificates=(certs / "ca.crt").read_bytes(),
        require_client_auth=True,
    )
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((transfer_handler(transfer),))
    server.add_secure_port(f"127.0.0.1:{PORT}", credentials)
    await server.start()
    save()
    print("READY", flush=True)
    await server.wait_for_termination()


# --- measuring ----------------------------------------------------------------------------------


class FileServer:
    """Serves the plugin executable over loopback HTTP, as a download host would."""

    def __init__(self, directory: Path) -> None:
        handler = _quiet_handler(str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _quiet_handler(directory: str) -> type[http.server.SimpleHTTPRequestHandler]:
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=directory, **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def wait_port_free(deadline: float) -> None:
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", PORT))
                return
            except OSError:
                time.sleep(0.2)
    raise SystemExit(f"127.0.0.1:{PORT} stays busy")


@dataclass
class Agent:
    name: str
    argv: list[str]  # "{config}" is replaced by the config path
    go: bool = False


@dataclass
class Result:
    cpu_pct: float
    rss_mib: float
    private_mib: float
    delivered: int
    sent: int
    rate: float
    wall: float
    samples: list[float] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return max(self.sent - self.delivered, 0) if self.sent >= 0 else 0


class Bench:
    def __init__(self, go_dir: Path, base: Path, warmup: float = 12.0) -> None:
        self.go_dir = go_dir
        self.warmup = warmup
        self.base = base
        self.certs = base / "certs"
        shutil.copytree(go_dir / "certs", self.certs)
        files = base / "files"
        files.mkdir()
        shutil.copy2(go_dir / "bin" / PLUGIN, files / PLUGIN)
        self.sha256 = hashlib.sha256((files / PLUGIN).read_bytes()).hexdigest()
        self.files = FileServer(files)
        # The sink gets its own copies of grpc and uvloop: sharing the agent's mappings of
        # their extensions (12 and 1.3 MiB) would keep those pages resident in the agent (the
        # kernel pages out only pages no other process maps). On a host the center is
        # elsewhere. Found, not imported: this process mapping them would share them as well.
        self.sink_lib = base / "sink-lib"
        for package in ("grpc", "uvloop"):
            spec = importlib.util.find_spec(package)
            assert spec is not None
            assert spec.submodule_search_locations
            shutil.copytree(spec.submodule_search_locations[0], self.sink_lib / package)

    def close(self) -> None:
        self.files.close()

    def run(self, agent: Agent, detail: str, seconds: float, idle: bool) -> Result:
        run_dir = Path(tempfile.mkdtemp(prefix=f"{agent.name}-", dir=self.base))
        configs = [
            {
                "name": PLUGIN,
                "type": "",
                "version": "1.0.0",
                "sha256": self.sha256,
                "download_urls": [self.files.url(PLUGIN)],
                "detail": detail,
            }
        ]
        (run_dir / "configs.json").write_text(json.dumps(configs))
        tally_file = run_dir / "tally.json"
        wait_port_free(time.monotonic() + 30)
        sink_proc = subprocess.Popen(
            [sys.executable, __file__, "--sink", str(self.certs), str(run_dir / "configs.json"),
             str(tally_file)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": f"{self.sink_lib}:{ROOT}"},
        )
        assert sink_proc.stdout is not None
        if sink_proc.stdout.readline().strip() != "READY":
            sink_proc.kill()
            raise SystemExit("the sink did not start")
        work = run_dir / "work"
        work.mkdir()
        config = self._our_config(run_dir, work)
        argv = [a.replace("{config}", str(config)) for a in agent.argv]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "SPECIFIED_AGENT_ID": f"bench-{agent.name}"}
        proc = subprocess.Popen(
            argv, cwd=work, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            return self._measure(proc, work, tally_file, seconds, idle)
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            sink_proc.kill()
            sink_proc.wait()
            subprocess.run(["pkill", "-KILL", "-f", PLUGIN], check=False)
            shutil.rmtree(run_dir, ignore_errors=True)

    def _our_config(self, run_dir: Path, work: Path) -> Path:
        from elkeid_center.agent_config import write_agent_config

        return write_agent_config(
            run_dir / "agent.toml", work, self.certs,
            {"default": {"private": f"127.0.0.1:{PORT}"}}, compression="none",
            plugin_cgroup=PLUGIN_CGROUP,
        )

    def _measure(
        self, proc: subprocess.Popen[bytes], work: Path, tally_file: Path, seconds: float,
        idle: bool,
    ) -> Result:
        stderr = work / "plugin" / PLUGIN / f"{PLUGIN}.stderr"
        deadline = time.monotonic() + 60
        while not stderr.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"{proc.args[0]}: the plugin did not start within 60 s")
            time.sleep(0.02)
        # Both agents get the same warm-up before the window: start-up is not steady state.
        time.sleep(self.warmup)
        group = agent_group(proc.pid, lambda cmdline: PLUGIN in " ".join(cmdline))
        cpu0, wall0 = cpu_seconds(group), time.monotonic()
        samples: list[float] = []
        sent = -1
        end = wall0 + seconds
        settle_end = end + (0 if idle else SETTLE_SECONDS + 30)
        while time.monotonic() < settle_end:
            time.sleep(0.25)
            samples.append(rss_bytes(group) / 2**20)
            if idle or time.monotonic() < end:
                continue
            if sent < 0:
                m = SENT_RE.search(stderr.read_bytes())
                if m is None:
                    continue
                sent = int(m.group(1))
                settle_end = min(settle_end, time.monotonic() + SETTLE_SECONDS)
            if json.loads(tally_file.read_text())["count"] >= sent:
                break
        wall = time.monotonic() - wall0
        cpu = cpu_seconds(group) - cpu0
        private = private_bytes(group) / 2**20  # reads smaps: once, after the window
        tally = json.loads(tally_file.read_text())
        span = tally["last"] - tally["first"]
        return Result(
            cpu_pct=100 * cpu / wall,
            rss_mib=max(samples) if samples else 0.0,
            private_mib=private,
            delivered=tally["count"],
            sent=0 if idle else sent,
            rate=tally["count"] / span if span > 0 else 0.0,
            wall=wall,
            samples=samples,
        )


def combine(results: list[Result]) -> Result:
    return Result(
        cpu_pct=statistics.mean(r.cpu_pct for r in results),
        rss_mib=max(r.rss_mib for r in results),
        private_mib=max(r.private_mib for r in results),
        delivered=sum(r.delivered for r in results),
        sent=sum(r.sent for r in results),
        rate=statistics.mean(r.rate for r in results),
        wall=sum(r.wall for r in results),
    )


def frozen_default() -> Path | None:
    found = sorted((ROOT / "dist").glob("elkeid-agent-*-linux-amd64"))
    return found[-1] if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sink", nargs=3, metavar=("CERTS", "CONFIGS", "TALLY"))
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=12.0, help="seconds before each window")
    parser.add_argument("--only", default="idle,5000,20000,flood")
    parser.add_argument("--repeats", type=int, default=1, help="A B … B A rounds per scenario")
    parser.add_argument("--go-dir", type=Path, default=ROOT.parent / "shared" / "go-agent")
    parser.add_argument("--frozen", type=Path, default=None)
    parser.add_argument("--no-frozen", action="store_true")
    args = parser.parse_args()
    if args.sink:
        import uvloop

        certs, configs_file, tally_file = args.sink
        uvloop.run(sink(Path(certs), json.loads(Path(configs_file).read_text()), tally_file))
        return
    go_bin = args.go_dir / "bin" / "elkeid-agent-go"
    if not go_bin.exists():
        print(f"bench/vs_go.py: skipped, no Go agent at {go_bin} (see ../shared/go-agent)")
        return
    agents = [
        Agent("go", [str(go_bin)], go=True),
        Agent("python", [sys.executable, "-m", "elkeid_agent", "run", "--config", "{config}"]),
    ]
    frozen = None if args.no_frozen else (args.frozen or frozen_default())
    if frozen is not None:
        agents.append(Agent("frozen", [str(frozen.resolve()), "run", "--config", "{config}"]))
    order = agents + agents[::-1]
    print(
        f"bench/vs_go.py: go-plugin-loadgen, compression none, {os.cpu_count()} CPUs, "
        f"{args.seconds:g} s windows after {args.warmup:g} s of warm-up, "
        f"order {' '.join(a.name for a in order)} x{args.repeats}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-vs-go-") as tmp:
        bench = Bench(args.go_dir, Path(tmp), args.warmup)
        try:
            for scenario in args.only.split(","):
                idle = scenario == "idle"
                rate = 0 if scenario in ("idle", "flood") else int(scenario)
                sending = args.warmup + args.seconds
                detail = "RATE=0 DURATION=0" if idle else f"RATE={rate} DURATION={sending:g}"
                results: dict[str, list[Result]] = {a.name: [] for a in agents}
                for _ in range(args.repeats):
                    for agent in order:
                        results[agent.name].append(bench.run(agent, detail, args.seconds, idle))
                report(scenario, {k: combine(v) for k, v in results.items()})
        finally:
            bench.close()


def report(scenario: str, results: dict[str, Result]) -> None:
    go = results["go"]
    label = scenario if scenario in ("idle", "flood") else f"{int(scenario):,}/s"
    for name, r in results.items():
        line = (f"{label:<9} {name:<7} CPU {r.cpu_pct:6.2f} %  RSS {r.rss_mib:6.1f} MiB"
                f" (private {r.private_mib:5.1f})")
        if scenario != "idle":
            line += f"  delivered {r.rate:>9,.0f}/s  lost {r.lost:>9,}"
        if name != "go":
            ratio = f"  ours/Go: CPU x{r.cpu_pct / go.cpu_pct:.2f}" if go.cpu_pct else ""
            ratio += f" RSS x{r.rss_mib / go.rss_mib:.2f}" if go.rss_mib else ""
            if scenario != "idle" and go.rate:
                ratio += f" delivered x{r.rate / go.rate:.2f}"
            line += ratio
        print(line, flush=True)


if __name__ == "__main__":
    main()
