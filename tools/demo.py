"""`make demo`: the whole system on this machine in one command.

Starts a local AgentCenter (mTLS on 127.0.0.1), serves examples/plugins.json (the SDK's demo
plugin) for download, signed with a publisher key the agent pins (docs/signing.md), and a
`tampered` copy changed after signing, starts the real agent against it, prints what arrives
for a while (the signed plugin's records; the tampered one refused, in the heartbeat's
state_detail), sends the plugin a task and the agent a shutdown, and exits with the agent's
status. With `--keep`
the directory (certificates, the agent's config, its work dir and log) stays for a look.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from elkeid_center.cli import resolve_configs  # noqa: E402
from elkeid_center.signing import TAMPERED, Publisher  # noqa: E402
from elkeid_center.store import DecodedRecord, record_name  # noqa: E402
from elkeid_center.testing import CenterThread  # noqa: E402

EXAMPLES = ROOT / "examples"
HEARTBEAT_KEYS = ("state", "net_mode", "cpu", "rss", "platform", "platform_version")


def show(record: DecodedRecord) -> str:
    fields = record.fields
    if record.data_type == 1000:
        brief = {k: fields[k] for k in HEARTBEAT_KEYS if k in fields}
        if fields.get("state_detail", "[]") != "[]":
            brief["state_detail"] = fields["state_detail"]
    else:
        brief = dict(list(fields.items())[:6])
    return f"  {record_name(record.data_type)}: {json.dumps(brief, ensure_ascii=False)}"


def run(directory: Path, seconds: float) -> int:
    files = directory / "files"
    publisher = Publisher(directory)
    configs = publisher.publish(json.loads((EXAMPLES / "plugins.json").read_text()),
                                EXAMPLES / "files", files, tampered=True)
    with CenterThread(directory / "certs", files_dir=files) as center:
        center.start()
        center.set_configs(resolve_configs(configs, files, center.file_url))
        config = center.write_agent_config(directory / "agent.toml", directory / "work",
                                           signing_key=publisher.public_key)
        log = directory / "work" / "log" / "elkeid-agent.log"
        print(f"center on {center.address}; agent config {config}; agent log {log}")
        print(f"plugins signed with publisher key {publisher.key_id}, pinned by the agent "
              f"(policy enforce); {TAMPERED!r} was changed after signing and is refused")
        # The demo plugin runs the first python3 on PATH: this one.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        agent = subprocess.Popen(
            [sys.executable, "-m", "elkeid_agent", "run", "--config", str(config)],
            env={**os.environ, "PYTHONPATH": str(ROOT), "PATH": path},
        )
        seen = 0
        try:
            deadline = time.monotonic() + seconds
            task_sent = False
            while time.monotonic() < deadline:
                time.sleep(0.5)
                records = center.records()
                for record in records[seen:]:
                    print(show(record))
                seen = len(records)
                if not task_sent and center.records(5999):
                    center.send_task(1, "demo", '{"hello": "plugin"}', "demo-task")
                    task_sent = True
            center.send_task(1060, "elkeid-agent", "", "demo-stop")
            status = agent.wait(20)
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
        for record in center.records()[seen:]:
            print(show(record))
        print(f"agent exited with {status}; {len(center.records())} records received")
        return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument(
        "--keep", action="store_true", help="keep the config, certificates and agent work dir"
    )
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="elkeid-demo-"))
    try:
        return run(directory, args.seconds)
    finally:
        if args.keep:
            print(
                f"kept {directory}: agent.toml, certs/, work/ (log in work/log/)\n"
                f"  {Path(sys.executable).parent}/elkeid-agent ctl status "
                f"--config {directory / 'agent.toml'}"
            )
        else:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
