"""proxyenv.py: Go's ProxyFromEnvironment decisions, by table (pure)."""

from __future__ import annotations

import base64
import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from elkeid_agent.proxyenv import Proxy, ProxyConfigError, ProxySettings, parse_proxy

NO_PROXY = (
    "foobar.com, .barbaz.net, *.wildcard.io, 192.168.1.1, 192.168.1.2:81, 192.168.1.3:80, "
    "10.0.0.0/30, 2001:db8::52:0:1, [2001:db8::52:0:3]:80, 2002:db8:a::45/64, bad.port:x, :80, "
    "odd.port:\u00b2, 10.0.0.0/99, [::1"
)
SETTINGS = ProxySettings.from_env({"HTTP_PROXY": "proxy:3128", "NO_PROXY": NO_PROXY})


@pytest.mark.parametrize(
    ("host", "proxied"),
    [
        # Never proxied, whatever NO_PROXY says.
        ("localhost", False),
        ("LOCALHOST", False),
        ("127.0.0.1", False),
        ("127.0.0.2", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("::2", True),
        # IP rules.
        ("192.168.1.1", False),
        ("192.168.1.2", True),  # the rule's port is 81
        ("192.168.1.3", False),  # rule with port 80
        ("192.168.1.4", True),
        ("10.0.0.2", False),  # CIDR
        ("10.0.0.4", True),
        ("2001:db8::52:0:1", False),
        ("2001:db8::52:0:2", True),
        ("2001:db8::52:0:3", False),
        ("2002:db8:a::123", False),  # IPv6 CIDR
        ("fe80::424b:c8be:1643:a1b6", True),
        ("0.0.0.0", True),
        # Domain rules.
        ("barbaz.net", True),  # ".barbaz.net" names subdomains only
        ("www.barbaz.net", False),
        ("foobar.com", False),
        ("www.foobar.com", False),  # "foobar.com" names the domain and its subdomains
        ("foofoobar.com", True),
        ("baz.com", True),
        ("localhost.net", True),
        ("local.localhost", True),
        ("wildcard.io", True),  # "*.wildcard.io" is subdomains only
        ("nested.wildcard.io", False),
        ("awildcard.io", True),
        ("bad.port", True),  # an entry with a non-numeric port matches nothing
    ],
)
def test_no_proxy_rules(host: str, proxied: bool) -> None:
    assert (SETTINGS.proxy_for("http", host, 80) is not None) is proxied


def test_ports_in_rules() -> None:
    settings = ProxySettings.from_env(
        {"HTTPS_PROXY": "proxy:3128", "NO_PROXY": "example.com:8443,1.2.3.4:443"}
    )
    assert settings.proxy_for("https", "example.com", 8443) is None
    assert settings.proxy_for("https", "example.com", 443) is not None
    assert settings.proxy_for("https", "1.2.3.4", 443) is None
    assert settings.proxy_for("https", "1.2.3.4", 8443) is not None


def test_star_means_no_proxy_at_all() -> None:
    settings = ProxySettings.from_env({"HTTP_PROXY": "p:1", "no_proxy": " * "})
    assert settings.proxy_for("http", "example.com", 80) is None
    assert settings.proxy_for("http", "8.8.8.8", 80) is None


def test_each_scheme_has_its_variable() -> None:
    only_http = ProxySettings.from_env({"HTTP_PROXY": "http://p:1"})
    assert only_http.proxy_for("http", "example.com", 80) == Proxy("p", 1)
    assert only_http.proxy_for("https", "example.com", 443) is None
    only_https = ProxySettings.from_env({"https_proxy": "http://q:2"})
    assert only_https.proxy_for("https", "example.com", 443) == Proxy("q", 2)
    assert only_https.proxy_for("http", "example.com", 80) is None
    assert ProxySettings.from_env({}).proxy_for("http", "example.com", 80) is None


def test_upper_case_wins_unless_empty() -> None:
    both = ProxySettings.from_env({"HTTP_PROXY": "upper:1", "http_proxy": "lower:2"})
    assert both.proxy_for("http", "example.com", 80) == Proxy("upper", 1)
    empty_upper = ProxySettings.from_env({"HTTP_PROXY": "", "http_proxy": "lower:2"})
    assert empty_upper.proxy_for("http", "example.com", 80) == Proxy("lower", 2)
    no_proxy = ProxySettings.from_env(
        {"HTTP_PROXY": "p:1", "NO_PROXY": "a.example", "no_proxy": "b.example"}
    )
    assert no_proxy.proxy_for("http", "a.example", 80) is None
    assert no_proxy.proxy_for("http", "b.example", 80) is not None


@pytest.mark.parametrize(
    ("value", "proxy"),
    [
        ("http://cache.corp.example.com:1234", Proxy("cache.corp.example.com", 1234)),
        ("cache.corp.example.com:1234", Proxy("cache.corp.example.com", 1234)),
        ("cache.corp.example.com", Proxy("cache.corp.example.com", 80)),
        ("127.0.0.1:8080", Proxy("127.0.0.1", 8080)),
        ("http://[fd00::1]:3128/", Proxy("fd00::1", 3128)),
        ("http://u%3Ax:p%40w@h:1", Proxy("h", 1, "Basic dTp4OnBAdw==")),
        ("http://u@h:1", Proxy("h", 1, "Basic dTo=")),
    ],
)
def test_proxy_values(value: str, proxy: Proxy) -> None:
    assert parse_proxy("HTTP_PROXY", value) == proxy


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("https://cache.example.com", "https proxies are not supported"),
        ("socks5://127.0.0.1", "socks5 proxies are not supported"),
        ("socks5h://127.0.0.1", "socks5h proxies are not supported"),
        ("http://h:99999", "not a valid proxy URL"),
        ("http://[::1", "not a valid proxy URL"),
        ("http://", "no proxy host"),
    ],
)
def test_unusable_proxy_values_name_the_variable(value: str, match: str) -> None:
    with pytest.raises(ProxyConfigError, match=match) as info:
        parse_proxy("HTTPS_PROXY", value)
    assert "HTTPS_PROXY" in str(info.value)


def test_proxy_address() -> None:
    assert Proxy("fd00::1", 3128).address == "[fd00::1]:3128"
    assert Proxy("p", 1).address == "p:1"


@given(st.text(max_size=60), st.text(max_size=60))
def test_any_environment_parses_or_names_the_variable(no_proxy: str, proxy: str) -> None:
    settings = ProxySettings.from_env({"HTTP_PROXY": proxy, "NO_PROXY": no_proxy})
    with contextlib.suppress(ProxyConfigError):
        settings.proxy_for("http", "example.com", 80)


def test_credentials_that_are_not_utf8_keep_their_bytes() -> None:
    # A non-UTF-8 byte in the service's environment reaches Python as a lone surrogate; its
    # encode() raised UnicodeEncodeError out of every request through the proxy, service
    # discovery's included, which ended the agent at each start. Go sends the bytes as they are.
    env = {"HTTP_PROXY": "http://us\udce9r:pw@proxy:3128"}
    proxy = ProxySettings.from_env(env).proxy_for("http", "example.com", 80)
    assert proxy is not None
    assert proxy.authorization == "Basic " + base64.b64encode(b"us\xe9r:pw").decode()

