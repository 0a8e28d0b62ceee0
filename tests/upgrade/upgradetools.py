"""Builders of real artifacts for the upgrade tests: tar.gz with tarfile, .deb with
dpkg-deb (and a hand-written ar writer for hostile ones), .rpm with rpmbuild."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = b"#!/bin/sh\necho B\n"


def answering(version: str, run: str = "exit 0") -> bytes:
    """A shell candidate that passes both probes as `version` (`--version`, and `selftest`
    with the ok answer); anything else runs `run`."""
    return (
        "#!/bin/sh\n"
        f'case "$1" in\n'
        f"--version) echo {version} ;;\n"
        f"selftest) echo '{{\"selftest\":\"ok\",\"version\":\"{version}\"}}' ;;\n"
        f"*) {run} ;;\n"
        "esac\n"
    ).encode()


def impostor(version: str) -> bytes:
    """Not our program at all: answers `--version` as `version`, exits 1 for anything else."""
    return (f'#!/bin/sh\nif [ "$1" = --version ]; then echo {version}; exit 0; fi\n'
            'echo "impostor: not an agent" >&2\nexit 1\n').encode()


def make_tar_gz(path: Path, members: list[tuple[str, bytes | None, str]]) -> Path:
    """members: (name, data, kind), kind file|symlink|dir|fifo; a symlink's data: its target."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                assert data is not None
                info.size = len(data)
                info.mode = 0o755
                tar.addfile(info, io.BytesIO(data))
            elif kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = (data or b"/etc/shadow").decode()
                tar.addfile(info)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
                tar.addfile(info)
    return path


def ar_archive(members: list[tuple[str, bytes]]) -> bytes:
    """A System V/GNU ar archive, as dpkg writes a .deb."""
    out = [b"!<arch>\n"]
    for name, data in members:
        header = (
            f"{name:<16}{0:<12}{0:<6}{0:<6}{0o100644:<8o}{len(data):<10}".encode() + b"`\n"
        )
        assert len(header) == 60
        out.append(header + data + (b"\n" if len(data) % 2 else b""))
    return b"".join(out)


def tar_bytes(members: list[tuple[str, bytes | None, str]], compression: str) -> bytes:
    buf = io.BytesIO()
    mode = {"gz": "w:gz", "xz": "w:xz", "": "w"}[compression]
    with tarfile.open(fileobj=buf, mode=mode) as tar:  # type: ignore[call-overload]
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                assert data is not None
                info.size, info.mode = len(data), 0o700
                tar.addfile(info, io.BytesIO(data))
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/bin/sh"
                tar.addfile(info)
            else:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
    return buf.getvalue()


def make_deb_by_hand(
    path: Path, members: list[tuple[str, bytes | None, str]], compression: str = "gz"
) -> Path:
    control = tar_bytes([("./control", b"Package: elkeid-agent\n", "file")], "gz")
    data = tar_bytes(members, compression)
    suffix = f".{compression}" if compression else ""
    path.write_bytes(
        ar_archive([("debian-binary", b"2.0\n"), ("control.tar.gz", control),
                    (f"data.tar{suffix}", data)])
    )
    return path


def make_deb(
    path: Path, executable: bytes, version: str = "2.0", compression: str = "gzip"
) -> Path:
    """A real .deb from dpkg-deb --build holding /etc/elkeid/elkeid-agent."""
    root = path.parent / f"debroot-{path.stem}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: elkeid-agent\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: t <t@localhost>\nDescription: test\n"
    )
    target = root / "etc" / "elkeid" / "elkeid-agent"
    target.parent.mkdir(parents=True)
    target.write_bytes(executable)
    target.chmod(0o700)
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", f"-Z{compression}", "--build", str(root), str(path)],
        check=True, capture_output=True,
    )
    shutil.rmtree(root)
    return path


def make_rpm(
    path: Path, executable: bytes, payload: str = "w9.gzdio", symlink: bool = False
) -> Path:
    """A real .rpm from rpmbuild; `payload` is rpm's _binary_payload (gzdio, xzdio...)."""
    top = path.parent / f"rpmtop-{path.stem}"
    (top / "SPECS").mkdir(parents=True)
    source = top / "agent.bin"
    source.write_bytes(executable)
    install = (
        "ln -s /bin/sh %{buildroot}/etc/elkeid/elkeid-agent" if symlink
        else f"install -m 0700 {source} %{{buildroot}}/etc/elkeid/elkeid-agent"
    )
    spec = top / "SPECS" / "a.spec"
    spec.write_text(
        "Name: elkeid-agent\nVersion: 2.0\nRelease: 1\nSummary: t\nLicense: x\n"
        "BuildArch: noarch\n"
        f"%define _binary_payload {payload}\n%define __os_install_post %{{nil}}\n"
        "%description\nt\n%install\nmkdir -p %{buildroot}/etc/elkeid\n"
        f"{install}\n%files\n/etc/elkeid/elkeid-agent\n"
    )
    subprocess.run(
        ["rpmbuild", "--define", f"_topdir {top}", "-bb", str(spec)],
        check=True, capture_output=True,
    )
    built = next((top / "RPMS").rglob("*.rpm"))
    shutil.move(built, path)
    shutil.rmtree(top)
    return path


need_rpmbuild = pytest.mark.skipif(shutil.which("rpmbuild") is None,
                                   reason="rpmbuild is not installed")
need_dpkg_deb = pytest.mark.skipif(shutil.which("dpkg-deb") is None,
                                   reason="dpkg-deb is not installed")


# -- stand-ins for versions A and B of the agent ---------------------------------------------

#: Runs the real agent from the source tree as "version X": `elkeid_agent.version.VERSION` is
#: replaced before anything imports it (a test-only trick; the product has no such hook).
#: Modes break B on purpose: "crash" dies right after the start-up check, "offline" never
#: reaches a server, "hang" hangs on --version, "nomodule" lacks uvloop (a module only the
#: run path imports, as a frozen build that lost it).
RUNNER = """
import os, sys, time
version, mode = sys.argv[1], sys.argv[2]
sys.argv = ["elkeid-agent", *sys.argv[3:]]
if mode == "hang" and "--version" in sys.argv:
    time.sleep(3600)
if mode == "nomodule":
    sys.modules["uvloop"] = None
import elkeid_agent.version
elkeid_agent.version.VERSION = version
from elkeid_agent.upgrade import manager
manager.DEFAULT_SETTINGS = manager.UpgradeSettings(
    confirm_bound=float(os.environ.get("TEST_UPGRADE_BOUND", "600")),
    probe_timeout=float(os.environ.get("TEST_PROBE_TIMEOUT", "60")),
)
if mode == "crash":
    from elkeid_agent import app

    async def broken(self):
        raise SystemExit("this build of the agent is broken")

    app.Agent.run = broken
elif mode == "offline":
    from elkeid_agent.transport import stream

    async def nowhere(self):
        return None

    stream.TransferLoop.connect = nowhere
from elkeid_agent.cli import main
raise SystemExit(main())
"""


def standin(runner_dir: Path, version: str, mode: str = "ok") -> bytes:
    """The bytes of a stand-in executable that runs the agent from source as `version`."""
    runner = runner_dir / "standin_runner.py"
    if not runner.exists():
        runner_dir.mkdir(parents=True, exist_ok=True)
        runner.write_text(RUNNER)
    return (f'#!/bin/sh\nexec "{sys.executable}" "{runner}" "{version}" "{mode}" "$@"\n'
            ).encode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Service:
    """Plays the service manager: runs `<work>/elkeid-agent run --config C` and restarts it.

    `guard`: before every start, run the upgrade guard as deploy/elkeid-agent.service's
    ExecStartPre does (only when upgrade.json and an executable .prev exist; its failure
    never blocks the start), with a fresh INVOCATION_ID per start as systemd gives."""

    def __init__(self, work: Path, config: Path, env: dict[str, str], guard: bool = False
                 ) -> None:
        self.work = work
        self.config = config
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **env}
        self.guard = guard
        self.guard_output: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.exits: list[int] = []

    def _run_guard(self) -> None:
        prev = self.work / "elkeid-agent.prev"
        if not (self.work / "upgrade.json").exists() or not os.access(prev, os.X_OK):
            return
        env = {**self.env, "INVOCATION_ID": uuid.uuid4().hex}
        done = subprocess.run([str(prev), "upgrade-guard", "--config", str(self.config)],
                              env=env, capture_output=True, text=True, timeout=120,
                              check=False)
        self.guard_output.append(done.stdout + done.stderr)

    def start(self) -> Service:
        assert self.proc is None or self.proc.poll() is not None
        if self.guard:
            self._run_guard()
        self.proc = subprocess.Popen(
            [str(self.work / "elkeid-agent"), "run", "--config", str(self.config)],
            env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.starts += 1
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self.exits.append(code)
        return code

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        path = self.work / "log" / "elkeid-agent.log"
        return path.read_text() if path.exists() else ""


@contextmanager
def http_files(
    files: dict[str, bytes], truncate: bool = False, hits: list[str] | None = None
) -> Iterator[str]:
    """An HTTP server of `files` (path -> body); yields its base URL. `truncate`: announce
    each body whole but close after half of it. Requested paths are appended to `hits`."""
    seen = hits if hits is not None else []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            seen.append(self.path)
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if truncate else body)
            self.close_connection = truncate

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
