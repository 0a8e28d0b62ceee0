"""`elkeid-agent selftest [--config PATH]`: the upgrade's deep probe of a candidate.

`--version` imports neither grpc nor the run path (it must stay fast), so a build that lost
a module or a shared library that only `run` loads passes it and dies at its first start,
before it can count its starts. The selftest walks the whole run path without side effects:
it imports every module of the agent and the modules loaded late or from C, reads the live
config (and the persisted specified_env) as `run` does, loads the TLS files, creates the
gRPC channel objects for every address of the configured region (never dialed), and opens
and closes a uvloop event loop. It writes nothing and touches no file of the work dir.

The answer is one JSON line on stdout, `{"selftest":"ok","version":"<VERSION>",
"framescan":"compiled"}`, exit 0 (`framescan`: whether the hot loop runs compiled or as
Python source); on failure `{"selftest":"failed","version":...,"error":...}`, exit 1.
`probe.py` accepts only the ok answer with the expected version.
"""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
import sys
from collections.abc import Mapping

import msgspec

from elkeid_agent.version import VERSION

OK = "ok"
FAILED = "failed"

#: Modules `run` needs that the agent's import statements do not load at import time:
#: uvloop (imported once the config is read) and pkgutil (grpc's cygrpc imports it from C
#: to read its root certificates, out of PyInstaller's sight), and the Ed25519 verifier
#: (imported at the first signature check: a build without it would refuse every signed
#: artifact in enforce, its own next upgrade included).
LATE_IMPORTS = ("uvloop", "pkgutil", "grpc._cython.cygrpc", "google.protobuf.message",
                "cryptography.hazmat.primitives.asymmetric.ed25519", "cryptography.exceptions")
#: Never imported by the selftest: the entry point runs the CLI when imported.
SKIPPED = ("elkeid_agent.__main__",)


class SelftestAnswer(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    selftest: str
    version: str
    error: str = ""
    framescan: str = ""


def run_selftest(config_path: str | None, environ: Mapping[str, str]) -> int:
    try:
        _exercise(config_path, dict(environ))
    except Exception as exc:  # noqa: BLE001 - the boundary: any failure is the answer
        answer = SelftestAnswer(selftest=FAILED, version=VERSION,
                                error=f"{type(exc).__name__}: {exc}")
        sys.stdout.write(msgspec.json.encode(answer).decode() + "\n")
        return 1
    from elkeid_agent import framescan

    answer = SelftestAnswer(selftest=OK, version=VERSION,
                            framescan="compiled" if framescan.compiled() else "source")
    sys.stdout.write(msgspec.json.encode(answer).decode() + "\n")
    return 0


def _exercise(config_path: str | None, env: dict[str, str]) -> None:
    # The run path first: grpc_env must set grpc's environment before grpc is imported.
    import elkeid_agent
    from elkeid_agent import specified_env
    from elkeid_agent.config import load_config
    from elkeid_agent.transport.discovery import candidates
    from elkeid_agent.transport.stream import channel_options
    from elkeid_agent.transport.tls import TlsMaterial

    for name in LATE_IMPORTS:
        importlib.import_module(name)
    found = [m.name for m in pkgutil.walk_packages(elkeid_agent.__path__, "elkeid_agent.")]
    if "elkeid_agent.app" not in found:
        # A bundle whose modules cannot be listed would pass without having imported them.
        raise ImportError(f"cannot list the agent's modules (found {len(found)})")
    for name in found:
        if name not in SKIPPED:
            importlib.import_module(name)
    config = load_config(config_path, env)
    persisted = specified_env.read(config.work_path)
    if persisted:
        env.update(persisted)
        config = load_config(config_path, env)
    tls = TlsMaterial.load(config.tls)
    region = config.regions.get(config.region)
    addresses = [c.address for c in candidates(region, [])] if region is not None else []

    async def channels() -> None:
        from elkeid_agent.transport.grpc_env import grpc

        options = channel_options(tls.server_name, config.transport.keepalive_seconds)
        for address in addresses:
            channel = grpc.aio.secure_channel(address, tls.credentials(), options=options)
            await channel.close()

    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(channels())
