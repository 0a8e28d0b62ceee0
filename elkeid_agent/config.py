"""Configuration: msgspec Structs filled from TOML, then the Go unit's environment overrides.

Layers, later wins: built-in defaults, the product config baked into the frozen executable
(`product.toml` beside this module), then `--config PATH` or `/etc/elkeid/elkeid-agent.toml`.
Unknown keys and wrong types are errors that name the file and the key.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from elkeid_agent import specified_env

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


class PluginsConfig(_Strict):
    max_frame_bytes: int = 8 * 1024 * 1024 - 64 * 1024 - 16
    task_queue: int = 64
    download_max_bytes: int = 512 * 1024 * 1024


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
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from exc


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
    config = apply_env(_convert(merged, source), env)
    _check_files(config, source)
    if config.region not in config.regions and config.regions:
        raise ConfigError(source, f"key region: no [regions.{config.region}] section")
    return config


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
        value = tomllib.loads(candidate.read_text()).get("work_dir")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        value = None
    return Path(value) if isinstance(value, str) and value else Path(Config().work_dir)


def _check_files(config: Config, source: str) -> None:
    for key in ("ca", "cert", "key"):
        value = getattr(config.tls, key)
        if not os.access(value, os.R_OK):
            raise ConfigError(source, f"key tls.{key}: cannot read {value}")
