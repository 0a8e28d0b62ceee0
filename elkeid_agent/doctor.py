"""`elkeid-agent doctor [--config PATH]`: the first thing an operator runs.

Reads the config exactly as `run` does (the layers, then specified_env), then checks, one line
each: the certificates (readable, dates with days left, the client certificate's usage and
chain as the AgentCenter will check them, the key), every address of the connection ladder in
order (service discovery, its nodes, private, public) dialed with the real TLS settings and name
pin, and the work dir (exists, writable, free space, exec allowed where the executable unpacks).
Exit status, for monitoring: 0 every check ok, 1 degraded (warnings only: the agent works, e.g.
service discovery down but the private address answering), 3 down (a check failed).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import shutil
import socket
import ssl
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TextIO

import msgspec

from elkeid_agent.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    ignored_region,
    load_run_config,
    work_dir_hint,
)
from elkeid_agent.plugins import cgroups
from elkeid_agent.readcap import CONFIG_FILE_BYTES, read_capped
from elkeid_agent.status import read_status
from elkeid_agent.transport.certinfo import CLIENT_AUTH, CertError, parse_pem, verify_client_cert
from elkeid_agent.transport.discovery import DiscoveryError, candidates, fetch_sd_nodes
from elkeid_agent.transport.probe import probe
from elkeid_agent.transport.tls import EXPIRY_WARN_DAYS, TlsError, TlsMaterial
from elkeid_agent.upgrade.hold import HOLD_FILE, hold_source
from elkeid_agent.version import VERSION

# A certificate this close to its end gets a warning: replacing certs on hosts takes time.
WARN_DAYS = EXPIRY_WARN_DAYS
# Plugins, their downloads and the unpacked executable live in the work dir.
MIN_FREE_BYTES = 200 * 1024 * 1024
# Exit status for monitoring (README, Operations).
EXIT_OK = 0
EXIT_DEGRADED = 1
EXIT_DOWN = 3
# Where the packages install the executable: an install of a build, not a checkout.
PACKAGED_EXECUTABLE = "/etc/elkeid/elkeid-agent"
# The organisation in every certificate of elkeid_center's test PKI, which `make dist` ships
# when CERTS_DIR is not set; and the marker build/inputs.sh puts in a default version.
TEST_PKI_MARK = b"elkeid-center test PKI"
TEST_VERSION_MARK = "~test"


class Verdict(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    verdict: Verdict
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.verdict.value:<4}  {self.name}: {self.detail}"


def _ok(name: str, detail: str) -> Check:
    return Check(Verdict.OK, name, detail)


def _fail(name: str, detail: str) -> Check:
    return Check(Verdict.FAIL, name, detail)


def _warn(name: str, detail: str) -> Check:
    return Check(Verdict.WARN, name, detail)


def _date(when: datetime.datetime) -> str:
    return when.strftime("%Y-%m-%d")


# --- certificates --------------------------------------------------------------------------------


def cert_dates(name: str, path: str, pem: bytes, now: datetime.datetime) -> Check:
    """Subject and validity of the first certificate in `pem`, with the days left."""
    try:
        info = parse_pem(pem)
    except CertError as exc:
        return _fail(name, f"{path}: {exc}")
    left = info.days_left(now)
    what = f"{path} ({info.subject or 'no CN'})"
    if info.not_before > now:
        return _fail(name, f"{what} is not valid until {_date(info.not_before)} (check the clock)")
    if left < 0:
        return _fail(name, f"{what} expired on {_date(info.not_after)}, {-left:.0f} days ago")
    dates = f"valid until {_date(info.not_after)} ({left:.0f} days left)"
    if name == "tls.cert" and info.extended_usage and CLIENT_AUTH not in info.extended_usage:
        return _fail(name, f"{what} is not for client authentication (extendedKeyUsage)")
    verdict = Verdict.WARN if left < WARN_DAYS else Verdict.OK
    return Check(verdict, name, f"{what} {dates}")


def check_certificates(config: Config, now: datetime.datetime) -> Iterator[Check]:
    tls = config.tls
    for key, path in (("tls.ca", tls.ca), ("tls.cert", tls.cert)):
        try:
            pem = read_capped(path, CONFIG_FILE_BYTES)
        except OSError as exc:
            yield _fail(key, f"cannot read {path}: {exc.strerror}")
            continue
        yield cert_dates(key, path, pem, now)
    try:
        material = TlsMaterial.load(tls)
    except TlsError as exc:
        if not str(exc).startswith("key tls.key: "):
            # The CA (or the certificate) failed above: the key is checked against the
            # certificate alone, so that its line does not take the blame.
            yield _key_alone(config)
            return
        yield _fail("tls.key", str(exc).removeprefix("key tls.key: "))
        return
    yield _ok("tls.key", f"{tls.key} is the unencrypted key of tls.cert")
    why = verify_client_cert(material.ca, material.cert_path, material.key_path)
    if why:
        yield _fail("tls chain", f"the AgentCenter will refuse tls.cert: {why}")
    else:
        yield _ok("tls chain", "tls.cert chains to tls.ca and is accepted for clientAuth")


def _key_alone(config: Config) -> Check:
    key = config.tls.key
    try:
        # The certificate stands in for the CA, which only has to be a certificate here.
        TlsMaterial.load(msgspec.structs.replace(config.tls, ca=config.tls.cert))
    except TlsError as exc:
        text = str(exc)
        if text.startswith("key tls.key: "):
            return _fail("tls.key", text.removeprefix("key tls.key: "))
        return _warn("tls.key", f"{key} not checked: tls.cert is not usable (above)")
    return _ok("tls.key", f"{key} is the unencrypted key of tls.cert")


def _is_test_ca(pem: bytes) -> bool:
    try:
        der = ssl.PEM_cert_to_DER_cert(pem.decode("ascii", "replace"))
    except ValueError:
        return False
    return TEST_PKI_MARK in der


def _is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_test_build(config: Config, program: str) -> Iterator[Check]:
    """On a packaged install, what `make dist` put in without a release's inputs."""
    if os.path.realpath(program) != PACKAGED_EXECUTABLE:
        return
    try:
        ca = Path(config.tls.ca).read_bytes()
    except OSError:
        ca = b""  # said by the tls.ca check
    if _is_test_ca(ca):
        yield _warn("test build", f"tls.ca {config.tls.ca} is the test CA of `make dist` "
                    "without CERTS_DIR: no real AgentCenter accepts this agent")
    region = config.regions.get(config.region)
    loopback = [a for a in (region.private, region.public) if a and _is_loopback(a)] if region \
        else []
    for address in loopback:
        yield _warn("test build", f"server {address} is this host (loopback): the built-in "
                    "server of `make dist` without PRODUCT_CONFIG, or a config to fix")


def _program() -> str:
    """The executable this process runs from: staticx names it; PyInstaller's is argv's."""
    if not getattr(sys, "frozen", False):
        return ""
    return os.environ.get("STATICX_PROG_PATH") or sys.executable


# --- connections ---------------------------------------------------------------------------------


async def _sd_nodes(host: str, within: float) -> list[str]:
    async with asyncio.timeout(within):
        return await fetch_sd_nodes(host)


def sd_reason(exc: DiscoveryError, host: str) -> str:
    """Why discovery failed, in the words of the dial lines, once (the check names the host)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError):
            return f"connection refused by {host}"
        if isinstance(cause, socket.gaierror):
            return f"cannot resolve {host.rpartition(':')[0] or host}"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror[:1].lower() + cause.strerror[1:]
        cause = cause.__cause__
    text = str(exc)
    for prefix in (f"service discovery {host}: ", f"cannot connect to {host}: "):
        text = text.removeprefix(prefix)
    return text


def check_connections(config: Config) -> Iterator[Check]:
    """Each address of the ladder, in the agent's order, dialed as the agent dials it."""
    region = config.regions.get(config.region)
    if region is None:
        yield _fail("connect", f"no [regions.{config.region}] with an address to dial")
        return
    try:
        tls = TlsMaterial.load(config.tls)
    except TlsError as exc:
        yield _fail("connect", f"not tried: {exc}")
        return
    timeout = config.transport.dial_timeout
    nodes: list[str] = []
    if region.service_discovery:
        host = region.service_discovery
        name = f"service discovery {host}"
        # The agent falls back to the private and public addresses: without SD it still
        # connects when one of those answers (their own lines say whether they do).
        missed = Verdict.WARN if region.private or region.public else Verdict.FAIL
        fallback = " (the agent goes on to the private and public addresses)" \
            if missed is Verdict.WARN else ""
        try:
            nodes = asyncio.run(_sd_nodes(host, timeout))
        except DiscoveryError as exc:
            yield Check(missed, name, sd_reason(exc, host) + fallback)
        except TimeoutError:
            yield Check(missed, name, f"no answer within {timeout:g} s{fallback}")
        else:
            yield Check(
                Verdict.OK if nodes else missed,
                name,
                f"{len(nodes)} node(s): {', '.join(nodes)}" if nodes
                else f"answered no nodes{fallback}",
            )
    ladder = candidates(region, nodes)
    if not ladder and not region.service_discovery:
        yield _fail("connect", f"[regions.{config.region}] names no address")
    for candidate in ladder:
        result = probe(candidate.address, tls, timeout)
        name = f"connect {candidate.net_mode} {candidate.address}"
        yield Check(Verdict.OK if result.ok else Verdict.FAIL, name, result.reason)


# --- work dir ------------------------------------------------------------------------------------


def check_work_dir(work_dir: Path) -> Iterator[Check]:
    # `run` creates a missing work dir: then what matters is the directory it would go in.
    base = work_dir
    while not base.is_dir() and base != base.parent:
        base = base.parent
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".doctor."):
            pass
    except OSError as exc:
        yield _fail("work dir", f"{base} is not writable: {exc.strerror}")
    else:
        later = "" if base == work_dir else f" does not exist yet; run creates it in {base}, which"
        yield _ok("work dir", f"{work_dir}{later} is writable")
    usage = shutil.disk_usage(base)
    free = f"{usage.free / 2**30:.1f} GiB free"
    if usage.free < MIN_FREE_BYTES:
        need = f"{MIN_FREE_BYTES >> 20} MiB"
        yield _fail("free space", f"{base}: only {free} (plugins need {need})")
    else:
        yield _ok("free space", f"{base}: {free}")
    unpack = work_dir / "tmp"
    where = unpack if unpack.is_dir() else base
    if os.statvfs(where).f_flag & os.ST_NOEXEC:
        yield _fail(
            "exec", f"{where} is on a noexec mount: the executable cannot unpack and run there"
        )
    else:
        yield _ok("exec", f"{where} allows executables (the unpack dir tmp/)")


# --- plugin limits -------------------------------------------------------------------------------


def check_plugin_limits(config: Config) -> Check:
    """What the running agent found (its status file), else what this process could do."""
    if not config.plugins.cgroups:
        return Check(Verdict.WARN, "plugin limits", "off (plugins.cgroups = false)")
    st = read_status(config.work_path)
    if st is not None and st.plugin_limits and st.state != "stopped":
        line, who = st.plugin_limits, f"agent pid {st.pid}"
    else:
        found = cgroups.probe()
        line = f"plugin limits {'can apply' if found.usable else 'cannot apply'}: {found.line}"
        who = "checked from this process"
    complete = " in effect (" in line or line.endswith(": memory, cpu, pids")
    return Check(Verdict.OK if complete else Verdict.WARN, "plugin limits", f"{line} ({who})")


# --- the command ---------------------------------------------------------------------------------


def checks(
    config_path: str | None, env: dict[str, str], program: str | None = None
) -> Iterator[Check]:
    if TEST_VERSION_MARK in VERSION:
        yield _warn("version", f"{VERSION} is a test build (`make dist` without BUILD_VERSION)")
    else:
        yield _ok("version", VERSION)
    if config_path is not None and not os.path.isfile(config_path):
        # A mistyped path: nothing to say about the work dir of a config that is not there.
        yield _fail("config", f"--config {config_path}: no such file")
        return
    try:
        config, merged = load_run_config(config_path, env)
    except ConfigError as exc:
        yield _fail("config", str(exc))
        yield from check_work_dir(work_dir_hint(config_path))
        return
    source = config_path or (
        str(DEFAULT_CONFIG_PATH) if DEFAULT_CONFIG_PATH.is_file() else "built-in defaults"
    )
    yield _ok(
        "config",
        f"{source}: work dir {config.work_dir}, idc {config.idc}, region {config.region}",
    )
    stale = ignored_region(config, merged)
    if stale:
        yield Check(Verdict.WARN, "specified_region",
                    f"{stale!r} names no [regions.{stale}]: region {config.region!r} is used")
    yield from check_certificates(config, datetime.datetime.now(datetime.UTC))
    yield from check_test_build(config, _program() if program is None else program)
    yield from check_connections(config)
    yield from check_work_dir(config.work_path)
    yield check_plugin_limits(config)
    yield check_upgrade_hold(config)


def check_upgrade_hold(config: Config) -> Check:
    """A hold is the operator's choice, never a failure; doctor says it stands."""
    source = hold_source(config.work_path, bool(config.upgrade.hold))
    if source == "config":
        return _ok("upgrade", "held by upgrade.hold in the config: pushed versions are ignored")
    if source == "ctl":
        return _ok("upgrade", f"held by `ctl hold` ({config.work_path / HOLD_FILE}): pushed "
                   "versions are ignored until `ctl release`")
    return _ok("upgrade", "not held: versions the server pushes are installed")


def run_doctor(config_path: str | None, out: TextIO) -> int:
    verdicts = set()
    try:
        for check in checks(config_path, dict(os.environ)):
            out.write(check.line() + "\n")
            out.flush()
            verdicts.add(check.verdict)
    except BrokenPipeError:
        # `doctor | head -1`: the reader is gone. Point the stream at /dev/null so that the
        # interpreter's last flush does not print a traceback either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
    if Verdict.FAIL in verdicts:
        return EXIT_DOWN
    return EXIT_DEGRADED if Verdict.WARN in verdicts else EXIT_OK
