"""`elkeid-agent doctor [--config PATH]`: the first thing an operator runs.

Reads the config exactly as `run` does (the layers, then specified_env), then checks, one line
each: the certificates (readable, dates with days left, the client certificate's usage and
chain as the AgentCenter will check them, the key), every address of the connection ladder in
order (service discovery, its nodes, private, public) dialed with the real TLS settings and name
pin, and the work dir (exists, writable, free space, exec allowed where the executable unpacks).
Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TextIO

from elkeid_agent.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    ignored_region,
    load_run_config,
    work_dir_hint,
)
from elkeid_agent.plugins import cgroups
from elkeid_agent.status import read_status
from elkeid_agent.transport.certinfo import CLIENT_AUTH, CertError, parse_pem, verify_client_cert
from elkeid_agent.transport.discovery import DiscoveryError, candidates, fetch_sd_nodes
from elkeid_agent.transport.probe import probe
from elkeid_agent.transport.tls import TlsError, TlsMaterial
from elkeid_agent.version import VERSION

# A certificate this close to its end gets a warning: replacing certs on hosts takes time.
WARN_DAYS = 30
# Plugins, their downloads and the unpacked executable live in the work dir.
MIN_FREE_BYTES = 200 * 1024 * 1024


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
            pem = Path(path).read_bytes()
        except OSError as exc:
            yield _fail(key, f"cannot read {path}: {exc.strerror}")
            continue
        yield cert_dates(key, path, pem, now)
    try:
        material = TlsMaterial.load(tls)
    except TlsError as exc:
        yield _fail("tls.key", str(exc).removeprefix("key tls.key: "))
        return
    yield _ok("tls.key", f"{tls.key} is the unencrypted key of tls.cert")
    why = verify_client_cert(material.ca, material.cert_path, material.key_path)
    if why:
        yield _fail("tls chain", f"the AgentCenter will refuse tls.cert: {why}")
    else:
        yield _ok("tls chain", "tls.cert chains to tls.ca and is accepted for clientAuth")


# --- connections ---------------------------------------------------------------------------------


async def _sd_nodes(host: str, within: float) -> list[str]:
    async with asyncio.timeout(within):
        return await fetch_sd_nodes(host)


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
        name = f"service discovery {region.service_discovery}"
        try:
            nodes = asyncio.run(_sd_nodes(region.service_discovery, timeout))
        except DiscoveryError as exc:
            yield _fail(name, str(exc))
        except TimeoutError:
            yield _fail(name, f"no answer within {timeout:g} s")
        else:
            yield Check(
                Verdict.OK if nodes else Verdict.FAIL,
                name,
                f"{len(nodes)} node(s): {', '.join(nodes)}" if nodes else "answered no nodes",
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


def checks(config_path: str | None, env: dict[str, str]) -> Iterator[Check]:
    yield _ok("version", VERSION)
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
    yield from check_connections(config)
    yield from check_work_dir(config.work_path)
    yield check_plugin_limits(config)


def run_doctor(config_path: str | None, out: TextIO) -> int:
    failed = False
    for check in checks(config_path, dict(os.environ)):
        out.write(check.line() + "\n")
        out.flush()
        failed |= check.verdict is Verdict.FAIL
    return 1 if failed else 0

