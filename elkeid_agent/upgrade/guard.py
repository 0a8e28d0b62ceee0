"""`elkeid-agent upgrade-guard [--config PATH]`: counts the starts of an unconfirmed new
version from outside it, and restores the previous executable when it is out of chances.

The new version counts its own starts in `check_pending_upgrade`, but only once its Python
code runs: a build that dies in the launcher, at an import, or is not our program at all
would crash-loop under Restart=always forever. So the service runs the guard before every
start from the saved previous executable (`<work_dir>/elkeid-agent.prev`), the version
known to work, whatever the new one is (deploy/elkeid-agent.service, `ExecStartPre=-`).

The guard does nothing unless `<work_dir>/upgrade.json` holds a pending swap. Then it
counts the start (`guard_starts`; a second run for the same systemd start, same
INVOCATION_ID, is not counted), and after `max_unconfirmed_starts` counted starts, or once
`confirm_bound` has passed, it rolls back exactly as the start-up check does (quarantine,
record marked rolled_back, `.prev` copied over the target), so the start that follows runs
the previous version, which reports the rollback. It never fails the start: every error is
logged to stderr and it exits 0.

Light on purpose (it runs under the unit's 10 % CPU quota before each start while an
upgrade is pending): config, record and file code only, no grpc, no event loop.
"""

from __future__ import annotations

import logging
import sys
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path

import msgspec

from elkeid_agent.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    UpgradeConfig,
    load_config,
    work_dir_hint,
)
from elkeid_agent.readcap import CONFIG_FILE_BYTES, read_text_capped
from elkeid_agent.upgrade import swap
from elkeid_agent.upgrade.record import CorruptFile, Verdict, decide_guard
from elkeid_agent.upgrade.rollback import boot_time, roll_back
from elkeid_agent.upgrade.settings import UpgradeSettings, with_overrides

log = logging.getLogger("elkeid_agent.upgrade.guard")


def run_guard(config_path: str | None, environ: Mapping[str, str]) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="elkeid-agent upgrade-guard: %(message)s")
    try:
        config = load_config(config_path, dict(environ))
        work_dir, upgrade = config.work_path, config.upgrade
    except ConfigError as exc:
        # The config is the new version's problem (or a TLS file's); the guard still needs
        # the work dir and the [upgrade] limits.
        work_dir, upgrade = work_dir_hint(config_path), _lenient_upgrade(config_path)
        log.warning("config refused (%s); using %s and its [upgrade] section", exc, work_dir)
    try:
        guard(work_dir, upgrade, environ.get("INVOCATION_ID", ""))
    except (OSError, CorruptFile) as exc:
        log.error("%s", exc)
    return 0


def _lenient_upgrade(config_path: str | None) -> UpgradeConfig:
    """The config file's [upgrade] section if it reads as one, else the built-in values."""
    path = Path(config_path) if config_path is not None else DEFAULT_CONFIG_PATH
    try:
        table = tomllib.loads(read_text_capped(path, CONFIG_FILE_BYTES)).get("upgrade", {})
        return msgspec.convert(table, UpgradeConfig)
    except (
        OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, msgspec.ValidationError,
        RecursionError,
    ):
        return UpgradeConfig()


def guard(work_dir: Path, upgrade: UpgradeConfig, invocation: str,
          now: float | None = None) -> Verdict:
    """Count this start of a pending upgrade; roll back when it is out of chances."""
    record = swap.read_record(work_dir)
    now = time.time() if now is None else now
    settings = with_overrides(UpgradeSettings(), upgrade)
    max_starts = settings.max_unconfirmed_starts
    decision = decide_guard(record, now, bound=settings.confirm_bound, max_starts=max_starts,
                            boot=boot_time(), invocation=invocation)
    kept = decision.record
    if decision.verdict is Verdict.AWAIT_CONFIRM and kept is not None:
        swap.write_record(work_dir, kept)
        log.info("upgrade from %s to %s: start %d of %d without confirmation",
                 kept.from_version, kept.to_version, kept.guard_starts, max_starts)
    elif decision.verdict is Verdict.ROLL_BACK and kept is not None:
        message = roll_back(work_dir, kept, decision.reason, now, settings.quarantine_seconds)
        log.error("%s; %s starts now", message, kept.from_version)
    return decision.verdict
