"""`make demo`: the whole system on this machine in one command.

Starts a local AgentCenter (mTLS on 127.0.0.1), serves the SDK's demo plugin for download,
starts the real agent against it, prints what arrives for a while, sends the plugin a task and
the agent a shutdown, and exits with the agent's status.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from elkeid_center.testing import CenterThread  # noqa: E402


def demo_plugin(files: Path) -> tuple[str, str]:
    """A plugin executable wrapping the SDK demo; returns (file name, sha256)."""
    files.mkdir(parents=True, exist_ok=True)
    plugin = files / "demo"
    plugin.write_text(
        f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m elkeid_plugin_sdk.demo\n"
    )
    plugin.chmod(0o755)
    return plugin.name, hashlib.sha256(plugin.read_bytes()).hexdigest()


def show(record_type: int, fields: dict[str, str]) -> str:
    keys = ("net_mode", "state", "cpu", "rss", "platform", "platform_version")
    if record_type == 1000:
        brief = {k: fields[k] for k in keys if k in fields}
    else:
        brief = dict(list(fields.items())[:6])
    return f"  {record_type}: {brief}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=12.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="elkeid-demo-") as tmp, CenterThread(
        Path(tmp) / "certs", files_dir=Path(tmp) / "files"
    ) as center:
        center.start()
        name, digest = demo_plugin(Path(tmp) / "files")
        center.set_configs([{"name": "demo", "version": "1.0.0", "sha256": digest,
                             "download_urls": [center.file_url(name)]}])
        config = center.write_agent_config(Path(tmp) / "agent.toml", Path(tmp) / "work")
        print(f"center on {center.address}; agent config {config}")
        agent = subprocess.Popen(
            [sys.executable, "-m", "elkeid_agent", "run", "--config", str(config)],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            seen = 0
            deadline = time.monotonic() + args.seconds
            task_sent = False
            while time.monotonic() < deadline:
                time.sleep(0.5)
                records = center.records()
                for record in records[seen:]:
                    print(show(record.data_type, record.fields))
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
            print(show(record.data_type, record.fields))
        print(f"agent exited with {status}; {len(center.records())} records received")
        return status


if __name__ == "__main__":
    raise SystemExit(main())
