"""`elkeid-agent diagnostics [--config F] [--output F]`: one bounded tar.gz for a support case.

What it holds (each member named in `manifest.json`, with its size, source and any cut):
version and build facts, the effective config and the relevant environment with every secret
removed, `doctor`'s output, `ctl status --json`, the last heartbeats (`heartbeats.json`, kept by
the agent), the log's tail, each plugin's state, files and stderr tail, the spool's counters
and files, the systemd unit and its drop-ins, the cgroup limits in effect for the agent, the
kernel and OS release. It reads files only (and runs `doctor` and `ctl status` as children),
so it works with the agent running or stopped.

Bounds: the bundle is at most MAX_BUNDLE_BYTES (4 MiB): every member is cut to its own cap
(its tail, for logs) and all together to CONTENT_BUDGET, which leaves room for the tar headers
and gzip's worst case. Secrets: the private key is never read into the bundle; every member
passes through `Scrubber`, which masks URL credentials (redact.py), the proxy passwords (of
this environment, of the unit's `Environment=` lines and of the running agent's process, as the
agent's proxy is usually set in its unit, not in root's shell) and any line of the private
key's PEM (a plugin could print it), as a last guard.
"""

from __future__ import annotations

import errno
import io
import json
import os
import platform
import shlex
import socket
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from elkeid_agent.childenv import child_env
from elkeid_agent.config import Config, ConfigError, TlsConfig, load_run_config, work_dir_hint
from elkeid_agent.ctl import is_agent_process
from elkeid_agent.fsutil import atomic_write
from elkeid_agent.heartbeat_ring import RING_FILE, read_ring
from elkeid_agent.redact import MASK, redact, redact_mapping, secret_name
from elkeid_agent.status import STATUS_FILE, read_status
from elkeid_agent.version import PRODUCT, VERSION

MAX_BUNDLE_BYTES = 4 * 1024 * 1024
# Tar headers (a 512-byte header and up to 511 bytes of padding a member), the end blocks
# and gzip's expansion of incompressible data (< 0.1 %) fit in what is left.
MAX_MEMBERS = 200
CONTENT_BUDGET = MAX_BUNDLE_BYTES - MAX_MEMBERS * 1024 - 64 * 1024 - 20 * 1024
LOG_TAIL = 1024 * 1024
STDERR_TAIL = 64 * 1024
SMALL_FILE = 64 * 1024
RING_MAX = 256 * 1024
MAX_PLUGINS = 32
MAX_LISTED = 100
MAX_DROPINS = 16
DOCTOR_TIMEOUT = 180.0
STATUS_TIMEOUT = 30.0
SERVICE = "elkeid-agent.service"
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/lib/systemd/system",
             "/usr/lib/systemd/system")
PROXY_VARIABLES = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY",
                   "no_proxy")
# Limits worth knowing, cgroup v2 then v1 (controller, file).
CGROUP_V2_FILES = ("memory.max", "memory.high", "memory.swap.max", "memory.current",
                   "cpu.max", "cpu.weight", "pids.max", "pids.current")
CGROUP_V1_FILES = (("memory", "memory.limit_in_bytes"), ("memory", "memory.usage_in_bytes"),
                   ("cpu", "cpu.cfs_quota_us"), ("cpu", "cpu.cfs_period_us"),
                   ("cpu,cpuacct", "cpu.cfs_quota_us"), ("cpu,cpuacct", "cpu.cfs_period_us"),
                   ("pids", "pids.max"))
# A process's environment is read whole or not at all (a cut keeps whole lines, and it has
# none); the kernel's own limit on it is far larger, a service's environment far smaller.
ENVIRON_MAX = 1024 * 1024
MIN_SECRET = 16  # shorter fragments of a key identify nothing


class Scrubber:
    """Masks secrets in a member's text: URL credentials, given strings, key lines."""

    def __init__(self, secrets: list[str]) -> None:
        # Longest first: a secret that contains another is masked whole.
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    @classmethod
    def for_host(cls, key_path: str | None, env: Mapping[str, str],
                 more: list[str] | None = None) -> Scrubber:
        """`more`: secrets found elsewhere (the proxy passwords of the agent's unit and
        process, which the environment diagnostics runs in need not share)."""
        secrets = [password for name in PROXY_VARIABLES
                   if (password := proxy_password(env.get(name, "")))]
        secrets += more or []
        if key_path:
            data, _ = read_head(Path(key_path), SMALL_FILE, follow=True)
            pem = data.decode("ascii", "replace")
            lines = [ln.strip() for ln in pem.splitlines() if ln.strip()]
            body = [ln for ln in lines if not ln.startswith("-----")]
            secrets += [ln for ln in body if len(ln) >= MIN_SECRET]
            secrets.append("".join(body))
        return cls(secrets)

    def text(self, text: str) -> str:
        text = redact(text)
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def data(self, data: bytes) -> bytes:
        return self.text(data.decode("utf-8", "surrogateescape")).encode(
            "utf-8", "surrogateescape")


def proxy_password(value: str) -> str:
    """The password of a proxy URL as typed (to the last `@`), "" when there is none."""
    rest = value.partition("://")[2] or value
    userinfo, at, _ = rest.rpartition("@")
    return userinfo.partition(":")[2] if at else ""


def environment_passwords(pairs: list[str]) -> list[str]:
    """The proxy passwords among `NAME=value` assignments."""
    out = []
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name in PROXY_VARIABLES and (password := proxy_password(value)):
            out.append(password)
    return out


def unit_passwords(text: str) -> list[str]:
    """The proxy passwords a unit's `Environment=` lines set (quoted as systemd quotes)."""
    pairs: list[str] = []
    for line in text.splitlines():
        key, _, value = line.strip().partition("=")
        if key.strip() != "Environment":
            continue
        try:
            pairs += shlex.split(value)
        except ValueError:  # an unbalanced quote: the words as they stand
            pairs += value.split()
    return environment_passwords(pairs)


def process_passwords(pid: int) -> list[str]:
    """The proxy passwords in the environment of process `pid` (the running agent's)."""
    data, _ = read_head(Path(f"/proc/{pid}/environ"), ENVIRON_MAX, follow=True)
    return environment_passwords(data.decode("utf-8", "surrogateescape").split("\0"))


class Bundle:
    """Members within the bound, scrubbed, and the manifest that lists them."""

    def __init__(self, scrubber: Scrubber) -> None:
        self.scrubber = scrubber
        self.members: list[tuple[str, bytes]] = []
        self.manifest: list[dict[str, Any]] = []
        self.left = CONTENT_BUDGET

    def add(self, name: str, data: bytes, source: str, note: str = "") -> None:
        data = self.scrubber.data(data)
        if len(self.members) >= MAX_MEMBERS - 1:  # one place stays for the manifest
            self.manifest.append({"name": name, "bytes": 0, "source": source,
                                  "note": "left out: too many members"})
            return
        if len(data) > self.left:
            data = data[len(data) - self.left:] if self.left > 0 else b""
            data = data[data.find(b"\n") + 1:]  # from a line start, as read_tail does
            note = (note + "; " if note else "") + "cut (its end kept) to stay within the bound"
        self.left -= len(data)
        self.members.append((name, data))
        self.manifest.append({"name": name, "bytes": len(data), "source": source,
                              **({"note": note} if note else {})})

    def add_json(self, name: str, value: Any, source: str, note: str = "") -> None:
        self.add(name, json.dumps(value, indent=2, default=str).encode() + b"\n", source, note)

    def tar_gz(self, facts: Mapping[str, Any]) -> bytes:
        manifest = {**facts, "bound_bytes": MAX_BUNDLE_BYTES, "members": self.manifest}
        members = [("manifest.json", json.dumps(manifest, indent=2).encode() + b"\n"),
                   *self.members]
        out = io.BytesIO()
        now = time.time()
        with tarfile.open(fileobj=out, mode="w:gz") as tar:
            for name, data in members:
                info = tarfile.TarInfo(f"elkeid-agent-diagnostics/{name}")
                info.size, info.mtime, info.mode = len(data), int(now), 0o600
                tar.addfile(info, io.BytesIO(data))
        return out.getvalue()


# --- readers -------------------------------------------------------------------------------------


def _open_regular(path: Path, follow: bool) -> BinaryIO:
    """`path` opened for reading if it is a regular file, never blocking on a FIFO; with
    `follow` False never through a final symlink (a plugin's could point at /etc/shadow).
    System files (`/etc/os-release`, units) are often links: they are followed."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return os.fdopen(fd, "rb")


def _whole_lines(data: bytes) -> bytes:
    """`data` up to its last line end: a cut never leaves part of a line (of a key, say) the
    scrubber could not recognise."""
    end = data.rfind(b"\n") + 1
    return data[:end]


def read_head(path: Path, limit: int, *, follow: bool = False) -> tuple[bytes, str]:
    """Up to `limit` bytes from the start, whole lines when cut; (data, note)."""
    try:
        with _open_regular(path, follow) as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        return b"", f"not read: {exc.strerror or exc}"
    if len(data) > limit:
        return _whole_lines(data[:limit]), f"the first {limit} bytes at most"
    return data, ""


def read_tail(path: Path, limit: int) -> tuple[bytes, str]:
    """The last `limit` bytes, from a line start; (data, note)."""
    try:
        with _open_regular(path, False) as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.seek(max(0, size - limit))
            data = fh.read(limit)
    except OSError as exc:
        return b"", f"not read: {exc.strerror or exc}"
    if size <= limit:
        return data, ""
    cut = data.find(b"\n") + 1
    return data[cut:], f"last {len(data) - cut} of {size} bytes"


def listing(directory: Path) -> list[dict[str, Any]]:
    """Names, kinds, sizes and modes of a directory's entries (never their content)."""
    out: list[dict[str, Any]] = []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if len(out) >= MAX_LISTED:
                    out.append({"name": "...", "note": f"more than {MAX_LISTED} entries"})
                    break
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                kind = "dir" if entry.is_dir(follow_symlinks=False) else (
                    "link" if entry.is_symlink() else "file")
                out.append({"name": entry.name, "kind": kind, "bytes": st.st_size,
                            "mode": oct(st.st_mode & 0o7777), "mtime": int(st.st_mtime)})
    except OSError as exc:
        return [{"error": f"{directory}: {exc.strerror or exc}"}]
    return sorted(out, key=lambda e: str(e.get("name")))


def clean_config(value: Any, key: str = "") -> Any:
    """The config as plain data, secret-named values masked and URL credentials redacted."""
    if isinstance(value, dict):
        return {k: clean_config(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_config(v, key) for v in value]
    if isinstance(value, str):
        return MASK if value and secret_name(key) else redact(value)
    return value


def run_self(args: list[str], timeout: float) -> tuple[bytes, str]:
    """Run this executable's subcommand: (its stdout and stderr, a note with its exit)."""
    env = child_env()
    if getattr(sys, "frozen", False):
        command = [sys.executable]
    else:
        # -P: `-m` would put the current directory first on sys.path, and root may run this
        # from one another user can write (/tmp): the package that runs now is named instead.
        command = [sys.executable, "-P", "-m", "elkeid_agent"]
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        done = subprocess.run([*command, *args], env=env, capture_output=True,
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        return (exc.stdout or b"") + (exc.stderr or b""), f"stopped after {timeout:g} s"
    except OSError as exc:
        return b"", f"not run: {exc}"
    return done.stdout + done.stderr, f"exit status {done.returncode}"


def cgroup_text(pid: int, root: Path = Path("/")) -> str:
    """The cgroup of `pid` and the limits in effect there, one `file: value` a line."""
    membership, note = read_head(root / f"proc/{pid}/cgroup", SMALL_FILE, follow=True)
    text = membership.decode("utf-8", "replace")
    lines = [f"# /proc/{pid}/cgroup{' (' + note + ')' if note else ''}", text.rstrip(), ""]
    base = root / "sys/fs/cgroup"
    for line in text.splitlines():
        controllers, _, path = line.partition(":")[2].partition(":")
        path = path.lstrip("/")
        if not controllers:
            candidates = [base / path / name for name in CGROUP_V2_FILES]
        else:
            candidates = [base / ctl / path / name for ctl, name in CGROUP_V1_FILES
                          if ctl == controllers or ctl in controllers.split(",")]
        for file in candidates:
            data, why = read_head(file, 4096, follow=True)
            if not why:
                lines.append(f"{file.relative_to(root)}: {data.decode('utf-8', 'replace').strip()}")
    return "\n".join(lines) + "\n"


# --- the bundle ----------------------------------------------------------------------------------


def collect(config_path: str | None, env: Mapping[str, str]) -> tuple[Bundle, dict[str, Any]]:
    config: Config | None = None
    try:
        config, merged = load_run_config(config_path, env)
        work_dir = config.work_path
        key_path: str | None = config.tls.key
        config_note = ""
    except ConfigError as exc:
        # The key is still masked wherever the default config would look for it.
        merged, work_dir, key_path = dict(env), work_dir_hint(config_path), TlsConfig().key
        config_note = f"refused: {exc}"
    # Everything that tells a secret is read before the first member is added: each member is
    # scrubbed as it is added.
    status = read_status(work_dir)
    live = status is not None and status.state != "stopped" and is_agent_process(
        status.pid, status.started)
    units = read_units()
    found = [p for _, data, _ in units for p in unit_passwords(data.decode("utf-8", "replace"))]
    if live and status is not None:
        found += process_passwords(status.pid)
    bundle = Bundle(Scrubber.for_host(key_path, merged, found))
    facts: dict[str, Any] = {
        "tool": f"{PRODUCT} diagnostics", "version": VERSION, "created": time.time(),
        "hostname": socket.gethostname(), "work_dir": str(work_dir),
        "config": config_path or "default",
    }

    bundle.add_json("version.json", {
        "version": VERSION, "product": PRODUCT, "python": sys.version,
        "frozen": bool(getattr(sys, "frozen", False)), "executable": sys.executable,
        "product_config": _product_config(), "platform": platform.platform(),
    }, "this executable")
    if config is not None:
        bundle.add_json("config.json", clean_config(msgspec.to_builtins(config)),
                        "the effective config, as run reads it; secrets masked")
    else:
        bundle.add("config.json", json.dumps({"error": config_note}).encode(), "config",
                   config_note)
    wanted = {k: v for k, v in merged.items()
              if k in PROXY_VARIABLES or k.lower().startswith(("specified_", "elkeid_"))}
    bundle.add_json("environment.json", redact_mapping(wanted),
                    "the environment run uses (proxy and specified_*), secrets masked")

    config_args = ["--config", config_path] if config_path else []
    out, note = run_self(["doctor", *config_args], DOCTOR_TIMEOUT)
    bundle.add("doctor.txt", out, "elkeid-agent doctor", note)
    out, note = run_self(["ctl", "--work-dir", str(work_dir), "status", "--json"],
                         STATUS_TIMEOUT)
    bundle.add("ctl-status.json", out, "elkeid-agent ctl status --json", note)
    facts["agent_pid"] = status.pid if status is not None else 0

    data, note = read_head(work_dir / RING_FILE, RING_MAX)
    bundle.add("heartbeats.json", data, f"{work_dir / RING_FILE} (the last heartbeats)",
               note or ("" if data else "none kept yet"))
    log_path = work_dir / "log" / "elkeid-agent.log"
    data, note = read_tail(log_path, LOG_TAIL)
    bundle.add("log/elkeid-agent.log", data, str(log_path), note)

    ring = read_ring(work_dir, RING_MAX)
    last = ring[-1] if ring else {}
    _add_plugins(bundle, work_dir, last.get("plugins") or [])
    fields = last.get("fields") or {}
    bundle.add_json("spool.json", {
        "status": {k: v for k, v in msgspec.to_builtins(status).items()
                   if k.startswith("spool_")} if status is not None else {},
        "last_heartbeat": {k: v for k, v in fields.items() if k.startswith("spool_")},
        "files": listing(work_dir / "spool"),
    }, f"{work_dir / STATUS_FILE}, the last heartbeat, {work_dir / 'spool'}")

    for unit, data, note in units:
        bundle.add(f"systemd{unit}", data, str(unit), note)
    pid = status.pid if live and status is not None else os.getpid()
    which = "the agent's" if pid != os.getpid() else "this process's (no agent running)"
    bundle.add("cgroup.txt", cgroup_text(pid).encode(), f"{which} cgroup and its limit files")
    os_release, _ = read_head(Path("/etc/os-release"), SMALL_FILE, follow=True)
    uname = os.uname()
    bundle.add("os.txt", (f"kernel: {uname.sysname} {uname.release} {uname.version} "
                          f"{uname.machine}\n\n").encode() + os_release,
               "uname, /etc/os-release")
    return bundle, facts


def _product_config() -> str:
    from elkeid_agent.config import PRODUCT_CONFIG_PATH

    return str(PRODUCT_CONFIG_PATH) if PRODUCT_CONFIG_PATH.is_file() else "none"


def _add_plugins(bundle: Bundle, work_dir: Path, states: list[Any]) -> None:
    by_name = {s.get("name"): s for s in states if isinstance(s, dict)}
    base = work_dir / "plugin"
    try:
        names = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        names = []
    names = sorted(set(names) | {n for n in by_name if isinstance(n, str)})[:MAX_PLUGINS]
    for name in names:
        directory = base / name
        if directory.is_symlink():  # a plugin's link out of its directory is not followed
            bundle.add_json(f"plugins/{name}/state.json", {"error": "a symlink, not read"},
                            str(directory))
            continue
        bundle.add_json(f"plugins/{name}/state.json", {
            "last_heartbeat": by_name.get(name, "not in the last heartbeat"),
            "files": listing(directory),
        }, f"the last heartbeat, {directory}")
        stderr = directory / f"{name}.stderr"
        data, note = read_tail(stderr, STDERR_TAIL)
        bundle.add(f"plugins/{name}/{name}.stderr", data, str(stderr), note)


def read_units() -> list[tuple[Path, bytes, str]]:
    """The unit and its drop-ins: (path, content, note)."""
    out = []
    for directory in UNIT_DIRS:
        unit = Path(directory) / SERVICE
        if unit.is_file():
            out.append((unit, *read_head(unit, SMALL_FILE, follow=True)))
        dropins = Path(directory) / f"{SERVICE}.d"
        try:
            confs = sorted(dropins.glob("*.conf"))[:MAX_DROPINS]
        except OSError:
            confs = []
        out += [(conf, *read_head(conf, SMALL_FILE, follow=True)) for conf in confs]
    return out


def default_output(now: float | None = None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return Path(f"elkeid-agent-diagnostics-{socket.gethostname()}-{stamp}.tar.gz")


def run_diagnostics(config_path: str | None, output: str | None) -> int:
    bundle, facts = collect(config_path, dict(os.environ))
    data = bundle.tar_gz(facts)
    path = Path(output) if output else default_output()
    try:
        atomic_write(path, data, 0o600)
    except OSError as exc:
        sys.stderr.write(f"diagnostics: cannot write {path}: {exc.strerror or exc}\n")
        return 1
    sys.stdout.write(f"wrote {path} ({len(data)} bytes, {len(bundle.members) + 1} members; "
                     f"at most {MAX_BUNDLE_BYTES} bytes)\n")
    return 0
