"""Configuration: defaults, the issue's TOML, errors naming file and key, env overrides, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from elkeid_agent.config import (
    EX_CONFIG,
    Config,
    ConfigError,
    RegionConfig,
    apply_env,
    ignored_region,
    load_config,
)
from elkeid_center.certs import ensure_certs

ROOT = Path(__file__).resolve().parent.parent
NO_PRODUCT = Path("/nonexistent/product.toml")


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    """A real CA, client certificate and key (the CLI's TLS check loads them)."""
    directory = tmp_path / "certs"
    ensure_certs(directory)
    return directory


def tls_section(certs: Path) -> str:
    return (
        "[tls]\n"
        f'ca = "{certs / "ca.crt"}"\n'
        f'cert = "{certs / "client.crt"}"\n'
        f'key = "{certs / "client.key"}"\n'
        'server_name = "elkeid.com"\n'
    )


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def load(path: Path, env: dict[str, str] | None = None) -> Config:
    return load_config(path, env or {}, product=NO_PRODUCT)


def test_defaults() -> None:
    config = Config()
    assert config.work_dir == "/etc/elkeid"
    assert config.work_path == Path("/etc/elkeid")
    assert config.idc == "default"
    assert config.region == "default"
    assert config.tls.ca == "/etc/elkeid/certs/ca.crt"
    assert config.tls.cert == "/etc/elkeid/certs/client.crt"
    assert config.tls.key == "/etc/elkeid/certs/client.key"
    assert config.tls.server_name == "elkeid.com"
    assert config.transport.compression == "gzip"
    assert config.transport.dial_timeout == 15.0
    assert config.transport.keepalive_seconds >= 30
    assert config.transport.send_interval == 0.5
    assert config.transport.heartbeat_interval == 60.0
    assert (config.transport.backoff_initial, config.transport.backoff_multiplier) == (1.0, 1.6)
    assert config.transport.backoff_max == 120.0
    assert config.buffer.max_bytes == 16 * 1024 * 1024
    assert config.log.file_bytes == 1024 * 1024
    assert config.log.file_count == 10
    assert config.regions == {}


def test_minimal_file_fills_defaults(tmp_path: Path, certs: Path) -> None:
    config = load(write(tmp_path / "a.toml", tls_section(certs)))
    assert config.transport.compression == "gzip"
    assert config.work_dir == "/etc/elkeid"
    assert config.tls.ca == str(certs / "ca.crt")


def test_issue_example(tmp_path: Path, certs: Path) -> None:
    text = (
        f'work_dir = "{tmp_path / "work"}"\n'
        + tls_section(certs)
        + "[transport]\n"
        'compression = "none"\n'
        "[regions.default]\n"
        'service_discovery = "10.0.0.1:8088"\n'
        'private = "10.0.0.1:6751"\n'
        'public = "203.0.113.1:6751"\n'
        "[regions.eu]\n"
        'public = "198.51.100.7:6751"\n'
        "[buffer]\n"
        "max_bytes = 1048576\n"
    )
    config = load(write(tmp_path / "agent.toml", text))
    assert config.work_path == tmp_path / "work"
    assert config.transport.compression == "none"
    assert config.regions["default"] == RegionConfig(
        service_discovery="10.0.0.1:8088", private="10.0.0.1:6751", public="203.0.113.1:6751"
    )
    assert config.regions["eu"] == RegionConfig(public="198.51.100.7:6751")
    assert config.buffer.max_bytes == 1048576
    assert config.transport.dial_timeout == 15.0  # untouched keys keep their defaults


BAD = {
    "unknown key": ("[transport]\ncompresion = 'gzip'\n", "compresion"),
    "unknown top-level key": ("colour = 'blue'\n", "colour"),
    "unknown section": ("[transprot]\ncompression = 'gzip'\n", "transprot"),
    "wrong type": ("[transport]\ncompression = 5\n", "transport.compression"),
    "bad enum": ("[transport]\ncompression = 'snappy'\n", "transport.compression"),
    "wrong type in region": ("[regions.default]\nprivate = 6751\n", "private"),
    "section as string": ("tls = 'x'\n", "tls"),
    "buffer size as string": ("[buffer]\nmax_bytes = '64M'\n", "buffer.max_bytes"),
    "memory budget below 1 MiB": ("[buffer]\nmax_bytes = 1000\n", "max_bytes must be"),
    # The server's minimum is 5 s: faster pings get GOAWAY too_many_pings, a reconnect loop.
    "keepalive below the server's minimum": (
        "[transport]\nkeepalive_seconds = 4\n", "transport.keepalive_seconds"
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_file_names_file_and_key(tmp_path: Path, certs: Path, case: str) -> None:
    text, key = BAD[case]
    # Top-level keys go before the [tls] table, tables after it; only the case's key is wrong.
    if case == "section as string":
        body = text
    elif text.startswith("["):
        body = tls_section(certs) + text
    else:
        body = text + tls_section(certs)
    path = write(tmp_path / "bad.toml", body)
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message
    assert key in message
    assert "\n" not in message


def test_keepalive_at_the_server_minimum_is_accepted(tmp_path: Path, certs: Path) -> None:
    path = write(tmp_path / "agent.toml",
                 tls_section(certs) + "[transport]\nkeepalive_seconds = 5\n")
    assert load(path).transport.keepalive_seconds == 5
    with pytest.raises(ConfigError, match=r"key transport\.keepalive_seconds: .*>= 5"):
        load(write(path, tls_section(certs) + "[transport]\nkeepalive_seconds = 0\n"))


def test_not_toml(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.toml", "[tls\nca = \n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load(path)
    assert str(path) in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="cannot read") as info:
        load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("key", ["ca", "cert", "key"])
def test_unreadable_certificate(tmp_path: Path, certs: Path, key: str) -> None:
    missing = tmp_path / "nowhere" / f"{key}.pem"
    present = certs / {"ca": "ca.crt", "cert": "client.crt", "key": "client.key"}[key]
    text = tls_section(certs).replace(str(present), str(missing))
    path = write(tmp_path / "agent.toml", text)
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message
    assert f"tls.{key}" in message
    assert str(missing) in message


def test_region_without_section(tmp_path: Path, certs: Path) -> None:
    path = write(tmp_path / "a.toml", tls_section(certs) + "[regions.eu]\npublic = 'x:1'\n")
    with pytest.raises(ConfigError, match=r"key region") as info:
        load(path)
    assert str(path) in str(info.value)


def test_product_layer_then_file(tmp_path: Path, certs: Path) -> None:
    product = write(
        tmp_path / "product.toml",
        "[transport]\ncompression = 'none'\n[regions.default]\nprivate = '10.0.0.9:6751'\n",
    )
    path = write(tmp_path / "a.toml", tls_section(certs) + "[log]\nlevel = 'debug'\n")
    config = load_config(path, {}, product=product)
    assert config.transport.compression == "none"
    assert config.regions["default"].private == "10.0.0.9:6751"
    assert config.log.level == "debug"
    bad_product = write(tmp_path / "bad-product.toml", "[transport]\nnope = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {}, product=bad_product)
    assert str(bad_product) in str(info.value)


def test_env_overrides(tmp_path: Path, certs: Path) -> None:
    text = tls_section(certs) + "[regions.default]\nprivate = 'a:1'\n[regions.eu]\npublic = 'b:2'\n"
    path = write(tmp_path / "a.toml", text)
    config = load(path, {"specified_idc": "idc-7", "specified_region": "eu"})
    assert (config.idc, config.region) == ("idc-7", "eu")
    config = load(path, {"specified_idc": "", "specified_region": ""})
    assert (config.idc, config.region) == ("default", "default")
    # A persisted region the config no longer has: the config's own, said, not a refusal at
    # every start.
    env = {"specified_region": "mars"}
    config = load(path, env)
    assert config.region == "default"
    assert ignored_region(config, env) == "mars"
    env = {"specified_region": "eu"}
    assert ignored_region(load(path, env), env) is None
    # The config's own region missing is the operator's error: refused, named.
    with pytest.raises(ConfigError, match=r"regions\.nowhere"):
        load(write(tmp_path / "b.toml", "region = 'nowhere'\n" + text), {})


def test_apply_env_keeps_everything_else() -> None:
    config = Config(idc="a", region="b")
    out = apply_env(config, {"specified_idc": "x"})
    assert (out.idc, out.region) == ("x", "b")
    assert out.tls == config.tls
    assert apply_env(config, {}) == config


# --- through the real command line ----------------------------------------------------------


def run_cli(config: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith("specified_")}
    return subprocess.run(
        [sys.executable, "-m", "elkeid_agent", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
        check=False,
    )


CLI_BAD = {
    "unknown key": ("[transport]\ncompresion = 'gzip'\n", "compresion"),
    "wrong type": ("[transport]\ncompression = 5\n", "transport.compression"),
    "missing certificate": ("", "tls.key"),
}


@pytest.mark.parametrize("case", sorted(CLI_BAD))
def test_cli_exits_78_with_one_line(tmp_path: Path, certs: Path, case: str) -> None:
    text, key = CLI_BAD[case]
    tls = tls_section(certs)
    if case == "missing certificate":
        tls = tls.replace(str(certs / "client.key"), str(tmp_path / "gone.key"))
    config = write(tmp_path / "bad.toml", f'work_dir = "{tmp_path / "work"}"\n' + tls + text)
    result = run_cli(config, tmp_path)
    assert result.returncode == EX_CONFIG
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert str(config) in lines[0]
    assert key in lines[0]
    assert not (tmp_path / "work").exists()  # nothing started


def test_cli_bad_toml_syntax(tmp_path: Path) -> None:
    config = write(tmp_path / "bad.toml", "work_dir = \n")
    result = run_cli(config, tmp_path)
    assert result.returncode == EX_CONFIG
    assert len(result.stderr.splitlines()) == 1
    assert str(config) in result.stderr


def test_cli_certificate_not_pem_names_file(tmp_path: Path, certs: Path) -> None:
    junk = write(tmp_path / "junk.crt", "this is not a certificate\n")
    tls = tls_section(certs).replace(str(certs / "ca.crt"), str(junk))
    config = write(tmp_path / "bad.toml", f'work_dir = "{tmp_path / "work"}"\n' + tls)
    result = run_cli(config, tmp_path)
    assert result.returncode == EX_CONFIG
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "tls.ca" in lines[0]
    assert str(config) in lines[0] or str(junk) in lines[0]


def test_upgrade_overrides_apply_over_builtin_settings(tmp_path: Path, certs: Path) -> None:
    from elkeid_agent.upgrade.manager import DEFAULT_SETTINGS, settings_from

    config = write(
        tmp_path / "up.toml",
        tls_section(certs) + "[upgrade]\nconfirm_bound = 30.0\nmax_unconfirmed_starts = 2\n",
    )
    settings = settings_from(load_config(config, env={}).upgrade)
    assert (settings.confirm_bound, settings.max_unconfirmed_starts) == (30.0, 2)
    assert settings.probe_timeout == DEFAULT_SETTINGS.probe_timeout
