"""The self-upgrade's settings: built-in values and the operator's `[upgrade]` overrides.

Apart from `manager.py` so the upgrade guard (`guard.py`), which must not import the run
path, uses the very same values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import msgspec

from elkeid_agent.config import UpgradeConfig
from elkeid_agent.upgrade.artifact import MAX_CANDIDATE_BYTES


@dataclass(frozen=True)
class UpgradeSettings:
    confirm_bound: float = 600.0  # seconds from the swap to the new version's confirmation
    max_unconfirmed_starts: int = 3
    #: Each probe's deadline: `--version` under a 10 % CPU quota takes ~6-12 s (staticx),
    #: `selftest` about 1.6 times that (bench/startup.py).
    probe_timeout: float = 60.0
    quarantine_seconds: float = 24 * 3600.0
    #: The same version and sha256 are not tried again this soon after a failed attempt
    #: (the server pushes its Configs on every reconnect).
    retry_after: float = 600.0
    download_timeout: float = 600.0
    max_artifact_bytes: int = 512 * 1024 * 1024
    max_candidate_bytes: int = MAX_CANDIDATE_BYTES
    package_timeout: float = 600.0
    #: `upgrade.hold`: the running version stays whatever the server pushes (hold.py).
    hold: bool = False


def with_overrides(base: UpgradeSettings, config: UpgradeConfig) -> UpgradeSettings:
    """`base` with the keys the operator set in `[upgrade]`."""
    overrides = {k: v for k, v in msgspec.structs.asdict(config).items() if v is not None}
    return dataclasses.replace(base, **overrides)
