"""`elkeid-center serve` runs a local center and prints what agents send;
`elkeid-center send` pushes a Task or Configs to it through its loopback admin port.

    elkeid-center serve [--dir DIR] [--port P] [--files DIR] [--configs FILE.json] [--sign]
    elkeid-center send [--dir DIR] (--task JSON | --configs FILE.json [--set])
                       [--target all|latest]

Files uploaded by agents (task 1050) are saved under `DIR/uploads/`. In a Config, a download
URL without a scheme names a file under the served directory and becomes its URL on this
center; an empty sha256 becomes that file's.

With `--sign`, the center signs the plugins of `--configs` with its publisher key
(`DIR/publisher.key`, made on first use), serves the signed copies from `DIR/signed`, and
the agent.toml it writes pins that key with the signing policy `enforce` (docs/signing.md).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import hashlib
import itertools
import json
import re
import shlex
import signal
import socket
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
from elkeid_center.signing import Publisher
from elkeid_center.store import ConnectionInfo, DecodedRecord, ReceivedPackage, Upload, record_name

DEFAULT_DIR = Path(".work/center")
DEFAULT_PORT = 6751
ADMIN_PORT_FILE = "admin.port"
AGENT_CONFIG_FILE = "agent.toml"
UPLOADS_DIR = "uploads"
UPLOAD_TASK = 1050
TASK_KEYS = frozenset({"data_type", "object_name", "data", "token"})


def format_record(record: DecodedRecord) -> str:
    """One line per record: stream, data_type and its name, timestamp, the fields as JSON."""
    body = (
        json.dumps(record.fields, ensure_ascii=False, sort_keys=True)
        if record.payload_ok
        else f"(not a Payload) {record.raw.hex()}"
    )
    return f"[{record.connection}] {record_name(record.data_type)} {record.timestamp} {body}"


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


def parse_json(text: str, source: str) -> Any:
    """JSON, or a ValueError naming the source, line and column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: line {e.lineno} column {e.colno}: {e.msg}") from None


def _read_configs(path: Path) -> list[dict[str, Any]]:
    """A JSON list of Config objects, or {"configs": [...]}."""
    value = parse_json(path.read_text(), str(path))
    if isinstance(value, dict):
        value = value.get("configs")
    if not isinstance(value, list) or not all(isinstance(c, dict) for c in value):
        raise ValueError(f"{path}: expected a JSON list of Config objects")
    return value


def resolve_configs(
    configs: list[dict[str, Any]], files_dir: Path, file_url: Any
) -> list[dict[str, Any]]:
    """Download URLs without a scheme name files under `files_dir`: make them this center's
    URLs (`file_url(name)`), and fill an empty sha256 from the file. ValueError names the
    Config and the file when it is missing."""
    out = []
    for config in configs:
        urls = config.get("download_urls", [])
        if not isinstance(urls, list):
            raise ValueError(f"Config {config.get('name')!r}: download_urls is not a list")
        local = [u for u in urls if isinstance(u, str) and "://" not in u]
        resolved = dict(config)
        resolved["download_urls"] = [file_url(u) if u in local else u for u in urls]
        if local and not config.get("sha256"):
            path = files_dir / local[0]
            try:
                resolved["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError as e:
                raise ValueError(f"Config {config.get('name')!r}: {path}: {e.strerror}") from e
        out.append(resolved)
    return out


class UploadSaver:
    """Saves each complete 1050 upload under `directory` as `<token>[-<file name>]`; the file
    name comes from the 1050 task this center sent with that token, when it did."""

    def __init__(self, directory: Path, out: TextIO) -> None:
        self.directory = directory
        self.out = out
        self._paths: dict[str, str] = {}
        self._unnamed = itertools.count(1)

    def expect(self, task: dict[str, Any]) -> None:
        """Remember the path a 1050 task asks for, to name the file it brings."""
        try:
            data = task.get("data", "")
            path = (json.loads(data) if isinstance(data, str) else data).get("path", "")
        except (ValueError, AttributeError):
            return
        if isinstance(path, str) and path:
            self._paths[str(task.get("token", ""))] = path

    def save(self, upload: Upload) -> Path:
        token = _safe_name(upload.token) or f"upload-{next(self._unnamed)}"
        source = self._paths.get(upload.token, "")
        name = f"{token}-{_safe_name(Path(source).name)}" if source else token
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.directory / name
        staging = target.with_name(f".{name}.part")
        staging.write_bytes(upload.data)
        staging.replace(target)
        digest = hashlib.sha256(upload.data).hexdigest()
        print(
            f"upload {upload.token!r}{f' ({source})' if source else ''}: {len(upload.data)} "
            f"bytes saved to {target} sha256 {digest}",
            file=self.out,
            flush=True,
        )
        return target


def _safe_name(text: str) -> str:
    # Tokens and paths come from the network: keep a plain file name.
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".")[:100]


class Admin:
    """Loopback control endpoint: `POST /command` with {"task": {...}} or
    {"configs": [...], "set": bool}, and optional "target" ("all" or "latest")."""

    def __init__(
        self, center: LocalCenter, files_dir: Path, uploads: UploadSaver | None = None
    ) -> None:
        self.center = center
        self.files_dir = files_dir
        self.uploads = uploads

    async def handle(self, request: Request) -> Response:
        if request.path != "/command" or request.method != "POST":
            return Response.text(404)
        try:
            body = parse_json(request.body.decode(errors="replace"), "request")
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
                if command.task.data_type == UPLOAD_TASK and self.uploads is not None:
                    self.uploads.expect(task)
            elif "configs" in body:
                configs = resolve_configs(body["configs"], self.files_dir, self.center.file_url)
                command = configs_command(configs)
                if body.get("set", False):
                    self.center.grpc.set_configs(configs)
            else:
                raise ValueError('expected "task" or "configs"')
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            return Response.json({"error": str(e)}, 400)
        sent = self.center.grpc.push(command, target)
        return Response.json({"sent": sent})


def port_or_any(host: str, port: int) -> int:
    """`port` when nothing listens on it, else 0 (the kernel picks one).

    Tried with a plain socket: gRPC sets SO_REUSEPORT, so its own bind would succeed beside
    another center and the two would share the agents' connections.
    """
    if port == 0:
        return 0
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            return 0
    return port


def hand_run_command(config: Path) -> str:
    """The shell line that runs the agent against this center as `make agent` does."""
    bin_dir = Path(sys.executable).parent  # the venv's bin (not resolved: that is /usr/bin)
    agent = bin_dir / "elkeid-agent"
    return (f"PATH={shlex.quote(str(bin_dir))}:\"$PATH\" ELKEID_LOG_STDERR=1 "
            f"{shlex.quote(str(agent))} run --config {shlex.quote(str(config))}")


async def serve(
    certs: CertFiles,
    port: int,
    files_dir: Path,
    configs: list[dict[str, Any]] | None,
    out: TextIO,
    sign: bool = False,
) -> None:
    """Run until SIGINT/SIGTERM; state goes next to the certs, in `certs.directory`."""
    directory = certs.directory
    free = port_or_any("127.0.0.1", port)
    if free != port:
        print(f"port {port} is taken: the center listens on another one (below)",
              file=out, flush=True)
    publisher = Publisher(directory) if sign else None
    if publisher is not None:
        signed = directory / "signed"
        configs = publisher.publish(configs or [], files_dir, signed)
        files_dir = signed
    center = LocalCenter(certs, port=free, files_dir=files_dir)
    center.store.add_listener(_printer(out))
    uploads = UploadSaver(directory / UPLOADS_DIR, out)
    center.store.add_upload_listener(uploads.save)
    admin = HttpServer(Admin(center, files_dir, uploads).handle)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await center.start()
    try:
        if configs is not None:
            # The file server's port is known now: local download URLs can be made absolute.
            center.grpc.set_configs(resolve_configs(configs, files_dir, center.file_url))
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
            signing_key=publisher.public_key if publisher is not None else None,
        )
        print(
            f"AgentCenter (mTLS, name elkeid.com) on {center.grpc.address}\n"
            f"service discovery on http://{center.host}:{center.sd_http.port}/registry/detail\n"
            f"files from {files_dir} at {center.file_url('')}\n"
            f"uploads (1050) saved under {directory / UPLOADS_DIR}\n"
            f"admin on 127.0.0.1:{admin_port}: elkeid-center send --dir {directory} --task JSON\n"
            f"start the agent with `make agent`, or by hand (its log on stderr, and this\n"
            f"environment's python3 first on PATH for the demo plugin):\n"
            f"  {hand_run_command(config)}",
            file=out,
            flush=True,
        )
        if publisher is not None:
            print(f"plugins signed with publisher key {publisher.key_id}, pinned in {config}",
                  file=out, flush=True)
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
    s.add_argument("--sign", action="store_true",
                   help="serve the plugins signed with DIR/publisher.key, pinned in agent.toml")
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
            asyncio.run(serve(ensure_certs(directory), args.port, files, configs, sys.stdout,
                              sign=args.sign))
            return 0
        body: dict[str, Any] = {"target": args.target}
        if args.task is not None:
            body["task"] = parse_json(args.task, "--task")
        else:
            body["configs"] = _read_configs(args.configs)
            body["set"] = args.set
        try:
            answer = send(args.dir, body)
        except RuntimeError as e:
            # The center refused what the file says: name the file.
            raise RuntimeError(f"{args.configs}: {e}" if args.configs else str(e)) from e
    except (OSError, ValueError, RuntimeError) as e:
        print(f"elkeid-center: {e}", file=sys.stderr)
        return 1
    print(f"sent to {answer['sent']} stream(s)")
    return 0
