"""Which proxy a request goes through, decided as Go's `http.ProxyFromEnvironment` does (pure).

The Go agent's downloads honour `HTTP_PROXY`, `HTTPS_PROXY` and `NO_PROXY` (each also in
lower case; the upper-case name wins when both are set and non-empty), so a host that needs a
proxy for them keeps working after the swap. Go's rules (golang.org/x/net/http/httpproxy):

* an http URL uses HTTP_PROXY, an https URL uses HTTPS_PROXY; an unset one means direct;
* `localhost` and loopback addresses are never proxied;
* NO_PROXY is a comma-separated list: `*` (nothing is proxied), an IP address or CIDR
  (`10.0.0.0/8`), an IP with a port (`1.2.3.4:80`, `[::1]:80`), or a domain (`example.com`
  matches it and every subdomain, `.example.com` and `*.example.com` only subdomains),
  optionally with a port;
* a proxy value without a scheme is taken as `http://`.

Only plain-http proxies are supported (Go also speaks TLS and SOCKS5 to a proxy): a proxy
URL of another scheme is an error naming the variable, as is a malformed one.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Schemes Go accepts in a proxy URL before it falls back to prefixing `http://`.
GO_PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")
DEFAULT_PORTS = {"http": 80, "https": 443, "socks5": 1080, "socks5h": 1080}


class ProxyConfigError(Exception):
    """A proxy variable holds something we cannot use; the message names the variable."""


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    #: `Proxy-Authorization` value when the proxy URL carries user:password.
    authorization: str | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class _IpRule:
    ip: IPAddress
    port: int | None


@dataclass(frozen=True)
class _DomainRule:
    #: Always with a leading dot: `.example.com`.
    suffix: str
    #: The rule named the domain itself too (`example.com`, not `.example.com`).
    exact_too: bool
    port: int | None


@dataclass(frozen=True)
class ProxySettings:
    """The proxy environment, parsed once; `proxy_for` answers per request."""

    http: str = ""
    https: str = ""
    no_proxy_all: bool = False
    networks: tuple[IPNetwork, ...] = ()
    ips: tuple[_IpRule, ...] = ()
    domains: tuple[_DomainRule, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ProxySettings:
        def first(*names: str) -> str:
            return next((env[n] for n in names if env.get(n)), "")

        settings = cls(first("HTTP_PROXY", "http_proxy"), first("HTTPS_PROXY", "https_proxy"))
        return settings._with_no_proxy(first("NO_PROXY", "no_proxy"))

    def _with_no_proxy(self, value: str) -> ProxySettings:
        networks: list[IPNetwork] = []
        ips: list[_IpRule] = []
        domains: list[_DomainRule] = []
        for raw in value.split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            if entry == "*":
                return ProxySettings(self.http, self.https, no_proxy_all=True)
            if "/" in entry:
                # Go ignores what it cannot parse, CIDRs included.
                with contextlib.suppress(ValueError):
                    networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            host, port = _split_entry(entry)
            if not host:
                continue
            ip = _ip(host)
            if ip is not None:
                ips.append(_IpRule(ip, port))
                continue
            if host.startswith("*."):
                host = host[1:]
            exact_too = not host.startswith(".")
            domains.append(_DomainRule(host if not exact_too else f".{host}", exact_too, port))
        return ProxySettings(
            self.http, self.https, False, tuple(networks), tuple(ips), tuple(domains)
        )

    def proxy_for(self, scheme: str, host: str, port: int) -> Proxy | None:
        """The proxy for a request to scheme://host:port, or None to connect directly."""
        variable, value = ("HTTPS_PROXY", self.https) if scheme == "https" else (
            "HTTP_PROXY", self.http
        )
        if not value or not self._use_proxy(host.lower(), port):
            return None
        return parse_proxy(variable, value)

    def _use_proxy(self, host: str, port: int) -> bool:
        if host == "localhost":
            return False
        ip = _ip(host)
        if ip is not None and ip.is_loopback:
            return False
        if self.no_proxy_all:
            return False
        if ip is not None:
            if any(ip in net for net in self.networks):
                return False
            if any(r.ip == ip and r.port in (None, port) for r in self.ips):
                return False
        return not any(
            (host.endswith(r.suffix) or (r.exact_too and host == r.suffix[1:]))
            and r.port in (None, port)
            for r in self.domains
        )


def _ip(text: str) -> IPAddress | None:
    """The address `text` names (an IPv4-mapped IPv6 address as its IPv4), else None."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _split_entry(entry: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]:port` or a bare IPv6 address -> (host, port)."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port_text = rest.removeprefix(":") if rest.startswith(":") else ""
    elif entry.count(":") == 1:
        host, _, port_text = entry.partition(":")
    else:
        return entry, None
    if not port_text:
        return host, None
    # isascii: str.isdigit() also accepts characters int() refuses, such as "²".
    return (host, int(port_text)) if port_text.isascii() and port_text.isdigit() else ("", None)


def _problem(exc: ValueError) -> str:
    text = str(exc)
    if text.startswith("Port out of range"):
        return "its port is out of range 0-65535"
    if not text or text.startswith("Port could not be cast"):
        return "its port is not a number (a password with / ? # or @ must be %-encoded)"
    if "IPv6" in text:
        return "its IPv6 address is malformed"
    return "it does not parse as a URL"


def parse_proxy(variable: str, value: str) -> Proxy:
    """The proxy a variable's value names; ProxyConfigError if it is unusable."""
    try:
        parts = urlsplit(value)
        if parts.scheme not in GO_PROXY_SCHEMES:
            parts = urlsplit(f"http://{value}")
        port = parts.port or DEFAULT_PORTS.get(parts.scheme, 80)
    except ValueError as exc:
        # Never urllib's words: they quote the netloc, and a password holding `/` or `#`
        # makes part of it the "port" they quote.
        raise ProxyConfigError(f"{variable} is not a valid proxy URL: {_problem(exc)}") from None
    if "@" in parts.path + parts.query + parts.fragment:
        # `user:123/x@host`: urllib reads host `user`, port 123, and every message naming the
        # proxy would show the user and the start of the password.
        raise ProxyConfigError(f"{variable} is not a valid proxy URL: {_problem(ValueError())}")
    if parts.scheme != "http":
        raise ProxyConfigError(f"{variable}: {parts.scheme} proxies are not supported (http is)")
    if not parts.hostname:
        raise ProxyConfigError(f"{variable} names no proxy host")
    authorization = None
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        # surrogateescape: a non-UTF-8 byte of the environment goes out as itself, as in Go.
        raw = credentials.encode("utf-8", "surrogateescape")
        authorization = "Basic " + base64.b64encode(raw).decode("ascii")
    return Proxy(parts.hostname, port, authorization)
