"""Issue 19's acceptance run: a spooled backlog drains to `center-go` (the real server's codec),
which is killed (SIGKILL) some seconds into the drain and started again; every record must
arrive, duplicates within the trail's bound.

    .venv/bin/python bench/drain_kill.py [--records 200000] [--kill-after 0.5 1 3]

Each run: a fresh work dir whose spool holds `--records` records of data_type 9999 (~300
bytes, a `seq` field each), our agent started against center-go on a free port of 127.0.0.1
(the PKI of ../shared/go-agent/certs), center-go killed `kill-after` seconds after its first
record and started again 0.5 s later; the union of `seq` over both center logs
(`-log-samples` logs every record) gives what was lost and what arrived twice.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from procstat import PLUGIN_CGROUP  # noqa: E402 - beside this file

from elkeid_agent.spool import format as fmt  # noqa: E402
from elkeid_agent.wire import encode_record, splice_records  # noqa: E402
from elkeid_center.agent_config import write_agent_config  # noqa: E402

# ../shared beside the clone, as in the README of bench/.
GO = REPO.parent / "shared" / "go-agent"


def free_port() -> int:
    # Not 6751: only the Go agent needs it, and other benches on the machine may hold it.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


PORT = free_port()
SEQ = re.compile(rb'"seq":"(\d+)"')


def prefill(spool: Path, total: int, per_entry: int = 1000) -> None:
    spool.mkdir(parents=True)
    pad = "p" * 240
    with (spool / fmt.segment_name(1)).open("wb") as out:
        for start in range(0, total, per_entry):
            records = [encode_record(9999, 1, {"seq": str(i), "pad": pad})
                       for i in range(start, min(total, start + per_entry))]
            out.write(fmt.encode_entry(2, len(records), 1, splice_records(records, b"")))


def start_center(base: Path, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [str(GO / "bin" / "center-go"), "-port", str(PORT), "-certs", str(base / "certs"),
         "-configs", str(base / "configs.json"), "-log-samples", "1000000000"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=base,
    )
    deadline = time.monotonic() + 10
    while b"TCP_LISTEN_OK" not in log.read_bytes():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"center-go did not start: {log.read_text()[-500:]}")
        time.sleep(0.02)
    return proc


def seqs(logs: list[Path]) -> list[bytes]:
    return [m for log in logs for m in SEQ.findall(log.read_bytes())]


def run(total: int, kill_after: float) -> dict[str, float]:
    base = Path(tempfile.mkdtemp(prefix="drain-kill-"))
    try:
        shutil.copytree(GO / "certs", base / "certs")
        (base / "configs.json").write_text("[]")
        work = base / "work"
        prefill(work / "spool", total)
        config = write_agent_config(base / "agent.toml", work, base / "certs",
                                    {"default": {"private": f"127.0.0.1:{PORT}"}},
                                    plugin_cgroup=PLUGIN_CGROUP)
        text = config.read_text().replace(
            "[transport]\n",
            "[transport]\nbackoff_initial = 0.2\nbackoff_max = 1.0\ndial_timeout = 1.0\n", 1)
        config.write_text(text)
        logs = [base / "center-1.log", base / "center-2.log"]
        center = start_center(base, logs[0])
        agent = subprocess.Popen(
            [sys.executable, "-m", "elkeid_agent", "run", "--config", str(config)],
            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while not SEQ.search(logs[0].read_bytes()):
                time.sleep(0.01)
            time.sleep(kill_after)
            center.send_signal(signal.SIGKILL)
            center.wait()
            before = len(set(seqs(logs[:1])))
            time.sleep(0.5)
            center = start_center(base, logs[1])
            started = time.monotonic()
            deadline = started + 120
            while len(set(seqs(logs))) < total and time.monotonic() < deadline:
                time.sleep(0.2)
            drained = time.monotonic() - started
            time.sleep(1)
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(30)
            center.send_signal(signal.SIGTERM)
            center.wait(10)
        got = seqs(logs)
        unique = len(set(got))
        return {"kill_after": kill_after, "before_kill": before, "received": len(got),
                "missing": total - unique, "duplicates": len(got) - unique,
                "drain_after_restart_s": round(drained, 1)}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--kill-after", type=float, nargs="+", default=[0.5, 1.0, 3.0])
    args = parser.parse_args()
    for after in args.kill_after:
        print(json.dumps(run(args.records, after)), flush=True)


if __name__ == "__main__":
    main()
