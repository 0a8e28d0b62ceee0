"""`elkeid-center serve` runs a local center and prints what agents send;
`elkeid-center send` pushes a Task or Configs to it through its loopback admin port.

    elkeid-center serve [--dir DIR] [--port P] [--files DIR] [--configs FILE.json]
    elkeid-center send [--dir DIR] (--task JSON | --configs FILE.json [--set])
                       [--target all|latest]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from elkeid_center.agent_config import write_agent_config
from elkeid_center.center import LocalCenter
from elkeid_center.certs import CertFiles, ensure_certs
from elkeid_center.httpd import HttpServer, Request, Response
from elkeid_center.server import Target, configs_command, task_command
from elkeid_center.store import ConnectionInfo, DecodedRecord, ReceivedPackage

DEFAULT_DIR = Path(".work/center")
DEFAULT_PORT = 6751
ADMIN_PORT_FILE = "admin.port"
AGENT_CONFIG_FILE = "agent.toml"
TASK_KEYS = frozenset({"data_type", "object_name", "data", "token"})


def format_record(record: DecodedRecord) -> str:
    """One line per record: stream, data_type, timestamp, then the fields as JSON."""
    body = (
        json.dumps(record.fields, ensure_ascii=False, sort_keys=True)
        if record.payload_ok
        else f"(not a Payload) {record.raw.hex()}"
    )
    return f"[{record.connection}] {record.data_type} {record.timestamp} {body}"


def _printer(out: TextIO) -> Any:
    def on_package(
        _package: ReceivedPackage, info: ConnectionInfo, records: list[DecodedRecord]
    ) -> None:
        if info.packages == 1:
            print(f"[{info.id}] stream from {info.peer}, agent_id {info.agent_id!r}", file=out)
        for record in records:
            print(format_record(record), file=out)
        out.flush()

    return on_package


def _read_configs(path: Path) -> list[dict[str, Any]]:
    """A JSON list of Config objects, or {"configs": [...]}."""
    value = json.loads(path.read_text())
    if isinstance(value, dict):
        value = value.get("configs")
    if not isinstance(value, list) or not all(isinstance(c, dict) for c in value):
        raise ValueError(f"{path}: expected a JSON list of Config objects")
    return value


class Admin:
    """Loopback control endpoint: `POST /command` with {"task": {...}} or
    {"configs": [...], "set": bool}, and optional "target" ("all" or "latest")."""

    def __init__(self, center: LocalCenter) -> None:
        self.center = center

    async def handle(self, request: Request) -> Response:
        if request.path != "/command" or request.method != "POST":
            return Response.text(404)
        try:
            body = json.loads(request.body)
            target: Target = body.get("target", "all")
            if target not in ("all", "latest"):
                raise ValueError(f"bad target {target!r}")
            if "task" in body:
                task = body["task"]
                unknown = set(task) - TASK_KEYS
                if unknown:
                    raise ValueError(f"unknown Task field(s): {sorted(unknown)}")
                command = task_command(
                    int(task["data_type"]),
                    str(task.get("object_name", "")),
                    task.get("data", ""),
                    str(task.get("token", "")),
                )
            elif "configs" in body:
                command = configs_command(body["configs"])
                if body.get("set", False):
                    self.center.grpc.set_configs(body["configs"])
            else:
                raise ValueError('expected "task" or "configs"')
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            return Response.json({"error": str(e)}, 400)
        sent = self.center.grpc.push(command, target)
        return Response.json({"sent": sent})


async def serve(
    certs: CertFiles,
    port: int,
    files_dir: Path,
    configs: list[dict[str, Any]] | None,
    out: TextIO,
) -> None:
    """Run until SIGINT/SIGTERM; state goes next to the certs, in `certs.directory`."""
    directory = certs.directory
    center = LocalCenter(certs, port=port, files_dir=files_dir)
    center.store.add_listener(_printer(out))
    if configs is not None:
        center.grpc.set_configs(configs)
    admin = HttpServer(Admin(center).handle)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await center.start()
    try:
        admin_port = await admin.start()
        (directory / ADMIN_PORT_FILE).write_text(f"{admin_port}\n")
        config = write_agent_config(
            directory / AGENT_CONFIG_FILE,
            directory / "agent-work",
            directory,
            {
                "default": {
                    "service_discovery": f"{center.host}:{center.sd_http.port}",
                    "private": center.grpc.address,
                }
            },
        )
        print(
            f"AgentCenter (mTLS, name elkeid.com) on {center.grpc.address}\n"
            f"service discovery on http://{center.host}:{center.sd_http.port}/registry/detail\n"
            f"files from {files_dir} at {center.file_url('')}\n"
            f"admin on 127.0.0.1:{admin_port}: elkeid-center send --dir {directory} --task JSON\n"
            f"start the agent with:\n"
            f"  .venv/bin/elkeid-agent run --config {config}",
            file=out,
            flush=True,
        )
        await stop.wait()
    finally:
        await admin.close()
        await center.close()
        (directory / ADMIN_PORT_FILE).unlink(missing_ok=True)


def send(directory: Path, body: dict[str, Any]) -> dict[str, Any]:
    """POST `body` to a running center's admin port; returns its JSON answer."""
    port_file = directory / ADMIN_PORT_FILE
    try:
        port = int(port_file.read_text())
    except (OSError, ValueError) as e:
        raise RuntimeError(f"{port_file}: no running center ({e})") from e
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/command",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            answer: dict[str, Any] = json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(e.read().decode(errors="replace").strip()) from e
    except urllib.error.URLError as e:
        raise RuntimeError(f"no running center on port {port}: {e.reason}") from e
    return answer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elkeid-center", description="Local Elkeid AgentCenter for tests and demos"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the center and print received records")
    s.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="certs, agent.toml, state")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC port (0 = any free)")
    s.add_argument("--files", type=Path, help="directory served for downloads (DIR/files)")
    s.add_argument("--configs", type=Path, help="JSON Configs pushed on each first heartbeat")
    c = sub.add_parser("send", help="push a Command to the agents of a running center")
    c.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    what = c.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", help='JSON Task, e.g. {"data_type":1060,"object_name":...}')
    what.add_argument("--configs", type=Path, help="JSON file with a list of Configs")
    c.add_argument("--set", action="store_true", help="also push these Configs on new streams")
    c.add_argument("--target", choices=("all", "latest"), default="all")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            configs = _read_configs(args.configs) if args.configs else None
            directory = args.dir.resolve()
            files = (args.files if args.files is not None else directory / "files").resolve()
            directory.mkdir(parents=True, exist_ok=True)
            files.mkdir(parents=True, exist_ok=True)
            asyncio.run(serve(ensure_certs(directory), args.port, files, configs, sys.stdout))
            return 0
        body: dict[str, Any] = {"target": args.target}
        if args.task is not None:
            body["task"] = json.loads(args.task)
        else:
            body["configs"] = _read_configs(args.configs)
            body["set"] = args.set
        answer = send(args.dir, body)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"elkeid-center: {e}", file=sys.stderr)
        return 1
    print(f"sent to {answer['sent']} stream(s)")
    return 0
