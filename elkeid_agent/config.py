"""Configuration: msgspec Structs filled from TOML, then the Go unit's environment overrides.

Layers, later wins: built-in defaults, the product config baked into the frozen executable
(`product.toml` beside this module), then `--config PATH` or `/etc/elkeid/elkeid-agent.toml`.
Unknown keys and wrong types are errors that name the file and the key.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from elkeid_agent import specified_env
from elkeid_agent.readcap import CONFIG_FILE_BYTES, read_text_capped
from elkeid_agent.signing.keys import decode_public_key

DEFAULT_CONFIG_PATH = Path("/etc/elkeid/elkeid-agent.toml")
PRODUCT_CONFIG_PATH = Path(__file__).with_name("product.toml")
#: The Elkeid server's keepalive enforcement: a client pinging more often gets GOAWAY.
MIN_KEEPALIVE_SECONDS = 5
EX_CONFIG = 78  # sysexits EX_CONFIG: systemd and operators know it as "bad configuration"


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class TlsConfig(_Strict):
    ca: str = "/etc/elkeid/certs/ca.crt"
    cert: str = "/etc/elkeid/certs/client.crt"
    key: str = "/etc/elkeid/certs/client.key"
    server_name: str = "elkeid.com"


class TransportConfig(_Strict):
    compression: Literal["gzip", "none"] = "gzip"
    dial_timeout: float = 15.0
    # The server answers pings more often than every 5 s with GOAWAY (too_many_pings) and the
    # agent would reconnect forever: below that is refused here. 30 s is well clear.
    keepalive_seconds: Annotated[int, msgspec.Meta(ge=MIN_KEEPALIVE_SECONDS)] = 30
    # Under a sustained stream, one message per interval. grpc's cost per message dominated at
    # high rates: at 20,000 rec/s 0.5 s took the agent from 3.9 % to 2.8 % of a core (10 to 2
    # messages/s). After a quiet spell the first record still goes at once, and a full message
    # goes without waiting for the interval.
    send_interval: Annotated[float, msgspec.Meta(gt=0)] = 0.5
    heartbeat_interval: float = 60.0
    backoff_initial: float = 1.0
    backoff_multiplier: float = 1.6
    backoff_max: float = 120.0
    backoff_jitter: float = 0.2


class RegionConfig(_Strict):
    service_discovery: str | None = None
    private: str | None = None
    public: str | None = None


class BufferConfig(_Strict):
    # The memory budget for plugin records: queued, in the messages being written (with
    # grpc's copy), in half-read frames and in the spool's queue, together (buffer.py). 16 MiB
    # keeps the agent under 100 MiB RSS with the largest frames and a server of any speed.
    max_bytes: int = 16 * 1024 * 1024
    agent_lane_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        # A quarter of the budget is the spool's queue (app.py): it must hold an entry or two.
        if self.max_bytes < 1024 * 1024:
            raise ValueError("max_bytes must be at least 1048576")


class SpoolConfig(_Strict):
    """The on-disk spool (docs/spool.md)."""

    enabled: bool = True
    max_bytes: int = 256 * 1024 * 1024
    min_free_bytes: int = 512 * 1024 * 1024
    # A SIGKILL or power loss loses at most this many seconds of spooled records.
    fsync_interval: float = 1.0

    def __post_init__(self) -> None:
        if self.max_bytes < 1024 * 1024:
            raise ValueError("max_bytes must be at least 1048576")
        if self.min_free_bytes < 0:
            raise ValueError("min_free_bytes must not be negative")
        if not 0.01 <= self.fsync_interval <= 60:
            raise ValueError("fsync_interval must be between 0.01 and 60")


_MIN_MEMORY = 16 * 1024 * 1024


class PluginLimits(_Strict):
    """Each plugin's cgroup limits (docs/plugins.md); 0 means none for that resource.

    Memory 200 MiB is osquery's watchdog figure for its worker, below the unit's cap on the
    agent and its plugins together (MemoryMax=250M): a runaway plugin meets its own limit
    first, so the kernel kills the plugin, not the agent. CPU: a weight of 50 (the kernel's
    default is 100, the agent's own) gives the agent two thirds of the CPU it shares with a
    spinning plugin, so heartbeats stay on time, and costs an idle host nothing; no quota by
    default, as the unit's CPUQuota=10% already caps the agent and its plugins together (a
    quota is for a plugin that must never take more). 512 processes stop a fork bomb well
    before the host's pid space runs out; Elkeid's plugins run a handful.
    """

    memory_bytes: Annotated[int, msgspec.Meta(ge=0)] = 200 * 1024 * 1024
    cpu_percent: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    cpu_weight: Annotated[int, msgspec.Meta(ge=0, le=10000)] = 50
    pids: Annotated[int, msgspec.Meta(ge=0)] = 512

    def __post_init__(self) -> None:
        _check_limits(self.memory_bytes, self.cpu_percent)


class PluginLimitsOverride(_Strict):
    """One plugin's limits where they differ from `plugins.limits`; unset keys inherit."""

    memory_bytes: Annotated[int, msgspec.Meta(ge=0)] | None = None
    cpu_percent: Annotated[float, msgspec.Meta(ge=0)] | None = None
    cpu_weight: Annotated[int, msgspec.Meta(ge=0, le=10000)] | None = None
    pids: Annotated[int, msgspec.Meta(ge=0)] | None = None

    def __post_init__(self) -> None:
        _check_limits(self.memory_bytes, self.cpu_percent)


def _check_limits(memory: int | None, cpu: float | None) -> None:
    if memory and memory < _MIN_MEMORY:
        raise ValueError(f"memory_bytes must be 0 (no limit) or at least {_MIN_MEMORY}")
    if cpu and cpu < 1:
        raise ValueError("cpu_percent must be 0 (no limit) or at least 1")


class PluginsConfig(_Strict):
    max_frame_bytes: int = 8 * 1024 * 1024 - 64 * 1024 - 16
    task_queue: int = 64
    download_max_bytes: int = 512 * 1024 * 1024
    # A download URL that brings less than download_min_bytes in any download_min_seconds
    # (from its request on) is abandoned for the next one; a Config entry's downloads, over
    # all its URLs, end after download_deadline seconds.
    download_min_bytes: Annotated[int, msgspec.Meta(ge=1)] = 64 * 1024
    download_min_seconds: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    download_deadline: Annotated[float, msgspec.Meta(gt=0)] = 1800.0
    # Each plugin's `<name>.stderr` keeps its newest part under this (plugins/stderr.py).
    stderr_max_bytes: int = 4 * 1024 * 1024
    #: Put each plugin in a cgroup of its own (limits, stop kills every descendant).
    cgroups: bool = True
    #: The cgroup under the agent's own that holds the plugin cgroups.
    #: No dot: no "..", and nothing that could be a cgroup's own file; not "agent", the leaf
    #: a v2 agent moves itself to.
    cgroup_name: Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Za-z_-]{1,64}$")] = (
        "elkeid-plugins"
    )
    limits: PluginLimits = msgspec.field(default_factory=PluginLimits)
    #: Per plugin name: `[plugins.limits_for.<name>]`.
    limits_for: dict[str, PluginLimitsOverride] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.stderr_max_bytes < 65536:
            raise ValueError("stderr_max_bytes must be at least 65536")
        if self.cgroup_name == "agent":
            raise ValueError("cgroup_name must not be 'agent'")

    def limits_of(self, name: str) -> tuple[int, float, int, int]:
        """(memory_bytes, cpu_percent, cpu_weight, pids) for one plugin: its override, else
        the default."""
        base, over = self.limits, self.limits_for.get(name, PluginLimitsOverride())
        return (
            base.memory_bytes if over.memory_bytes is None else over.memory_bytes,
            base.cpu_percent if over.cpu_percent is None else over.cpu_percent,
            base.cpu_weight if over.cpu_weight is None else over.cpu_weight,
            base.pids if over.pids is None else over.pids,
        )


class LogConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    file_bytes: int = 1024 * 1024
    file_count: int = 10
    # Error-level log lines become 1010 records, at most this many per minute.
    records_per_minute: int = 60


class UpgradeConfig(_Strict):
    """Overrides of the self-upgrade's settings; unset keys keep the built-in values."""

    confirm_bound: float | None = None
    max_unconfirmed_starts: int | None = None
    probe_timeout: float | None = None
    quarantine_seconds: float | None = None
    retry_after: float | None = None
    # True: the running version stays whatever the server pushes (`ctl hold` does the same
    # without a restart, and `ctl release` lifts only that one).
    hold: bool | None = None


class MetricsConfig(_Strict):
    # Path of a node_exporter textfile-collector file (`*.prom` in its directory), rewritten
    # at each heartbeat; empty: no metrics file.
    textfile: str = ""


class SigningKey(_Strict):
    """A pinned publisher key (docs/signing.md)."""

    public_key: str  # base64 of the 32 raw bytes of an Ed25519 public key
    not_after: datetime | None = None  # artifacts it signed are refused after this instant

    def __post_init__(self) -> None:
        decode_public_key(self.public_key)
        if self.not_after is not None and self.not_after.tzinfo is None:
            raise ValueError("not_after needs a time zone (e.g. 2027-01-01T00:00:00Z)")


class SigningConfig(_Strict):
    """Signatures on plugins and on the agent's own upgrades (docs/signing.md).

    `policy` unset: `enforce` when the product config (baked in at build time) pins a key,
    `off` otherwise. The keys of every layer are pinned together.
    """

    policy: Literal["off", "warn", "enforce"] | None = None
    keys: list[SigningKey] = msgspec.field(default_factory=list)


class Config(_Strict):
    work_dir: str = "/etc/elkeid"
    idc: str = "default"
    region: str = "default"
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    transport: TransportConfig = msgspec.field(default_factory=TransportConfig)
    regions: dict[str, RegionConfig] = msgspec.field(default_factory=dict)
    buffer: BufferConfig = msgspec.field(default_factory=BufferConfig)
    spool: SpoolConfig = msgspec.field(default_factory=SpoolConfig)
    plugins: PluginsConfig = msgspec.field(default_factory=PluginsConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    upgrade: UpgradeConfig = msgspec.field(default_factory=UpgradeConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    signing: SigningConfig = msgspec.field(default_factory=SigningConfig)

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir)


class ConfigError(Exception):
    """One line for the operator: which file, which key, what is wrong."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(f"{source}: {message}")


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(read_text_capped(path, CONFIG_FILE_BYTES))
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), f"not UTF-8: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from exc
    except RecursionError:
        raise ConfigError(str(path), "not valid TOML: nested too deeply") from None


def _convert(raw: Mapping[str, Any], source: str) -> Config:
    try:
        return msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(source, _keyed(str(exc))) from exc


def _keyed(message: str) -> str:
    # msgspec says "... - at `$.tls.ca`"; operators think in TOML keys: "key tls.ca: ...".
    text, sep, where = message.rpartition(" - at `")
    if not sep:
        return message
    key = where.rstrip("`").removeprefix("$").lstrip(".")
    return f"key {key or '(top level)'}: {text}"


def apply_env(config: Config, env: Mapping[str, str]) -> Config:
    """The Go agent's unit passes idc and region as environment (specified_env)."""
    idc = env.get("specified_idc") or config.idc
    region = env.get("specified_region") or config.region
    if region not in config.regions and config.region in config.regions:
        # Persisted by a 1051 task or `ctl set` for a config that has since dropped that
        # region: refusing it would stop every start, a crash loop no server task can end.
        # The config's own region, and `ignored_region` says so.
        region = config.region
    return msgspec.structs.replace(config, idc=idc, region=region)


def ignored_region(config: Config, env: Mapping[str, str]) -> str | None:
    """The specified_region that `apply_env` passed over for naming no [regions] section."""
    wanted = env.get("specified_region")
    return wanted if wanted and wanted != config.region else None


def load_config(
    path: str | Path | None, env: Mapping[str, str] | None = None, product: Path | None = None
) -> Config:
    """Build the effective config; raises ConfigError naming the file and key."""
    env = os.environ if env is None else env
    layers: list[tuple[str, dict[str, Any]]] = []
    product = PRODUCT_CONFIG_PATH if product is None else product
    if product.is_file():
        layers.append((str(product), _read_toml(product)))
    if path is not None:
        layers.append((str(path), _read_toml(Path(path))))
    elif DEFAULT_CONFIG_PATH.is_file():
        layers.append((str(DEFAULT_CONFIG_PATH), _read_toml(DEFAULT_CONFIG_PATH)))
    merged: dict[str, Any] = {}
    source = "built-in defaults"
    for source, raw in layers:
        _convert(raw, source)  # each layer alone must be valid, so errors name the right file
        merged = _merge(merged, raw)
    merged = _pinned_keys(merged, layers, product)
    config = apply_env(_convert(merged, source), env)
    _check_files(config, source)
    if config.region not in config.regions and config.regions:
        raise ConfigError(source, f"key region: no [regions.{config.region}] section")
    return config


def _pinned_keys(merged: dict[str, Any], layers: list[tuple[str, dict[str, Any]]],
                 product: Path) -> dict[str, Any]:
    """[signing]: every layer's keys together (a host adds keys to the built-in ones, a
    list would otherwise replace them), and `enforce` by default when the build pinned one."""
    signing = dict(merged.get("signing", {}))
    keys = [k for _, raw in layers for k in raw.get("signing", {}).get("keys", [])]
    if keys:
        signing["keys"] = keys
    built_in = any(source == str(product) and raw.get("signing", {}).get("keys")
                   for source, raw in layers)
    if built_in and "policy" not in signing:
        signing["policy"] = "enforce"
    return {**merged, "signing": signing} if signing else merged


def load_run_config(
    path: str | Path | None, env: Mapping[str, str]
) -> tuple[Config, dict[str, str]]:
    """The config and environment `run` uses: the layers, then the work dir's specified_env
    (values a 1051 task or `ctl set` persisted) over the process environment."""
    merged = dict(env)
    config = load_config(path, merged)
    persisted = specified_env.read(config.work_path)
    if persisted:
        merged.update(persisted)
        config = load_config(path, merged)
    return config, merged


def work_dir_hint(path: str | Path | None) -> Path:
    """The work dir a config names, read leniently, for when the config itself is refused.

    A newly upgraded agent that refuses its config must still count its failed starts in the
    work dir, so that the self-upgrade rolls it back.
    """
    candidate = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        value = tomllib.loads(read_text_capped(candidate, CONFIG_FILE_BYTES)).get("work_dir")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
        value = None
    return Path(value) if isinstance(value, str) and value else Path(Config().work_dir)


def _check_files(config: Config, source: str) -> None:
    for key in ("ca", "cert", "key"):
        value = getattr(config.tls, key)
        if not os.access(value, os.R_OK):
            raise ConfigError(source, f"key tls.{key}: cannot read {value}")
