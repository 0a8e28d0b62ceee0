"""Host facts for the heartbeat and the PackagedData header.

File-based facts are read through a root path (a host path ``/x`` is ``root / "x"``) so
tests run against fake trees; the few that come from the kernel (uname, interfaces) do not.

Platform detection follows gopsutil v3.21.8's ``host.PlatformInformation`` (the version the
Go agent links), so the server sees the same platform strings. Where this module differs
it says so next to the code.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePath

import msgspec
import psutil

from elkeid_agent.readcap import iter_lines, read_text_capped

ROOT = Path("/")
#: os-release, DMI and the other /etc files read whole for the host facts.
HOST_FILE_BYTES = 1024 * 1024
#: /proc/cpuinfo, /proc/stat, /proc/net/route: scanned a line at a time up to this.
PROC_SCAN_BYTES = 64 * 1024 * 1024


def under_root(root: Path, path: str | PurePath) -> Path:
    """The absolute host path ``path`` as seen under ``root``."""
    host_path = PurePath(path)
    if not host_path.is_absolute():
        raise ValueError(f"host path must be absolute: {path}")
    return root / host_path.relative_to("/")


def _read_text(path: Path) -> str | None:
    try:
        return read_text_capped(path, HOST_FILE_BYTES, errors="replace")
    except OSError:
        return None


def _scan_lines(path: Path) -> Iterator[str]:
    """The lines of a /proc file that may be large (a CPU per block of cpuinfo, a line per
    route), read a line at a time; an unreadable file has none, one past the cap no more."""
    try:
        yield from iter_lines(path, PROC_SCAN_BYTES)
    except OSError:
        return


def _read_lines(path: Path) -> list[str] | None:
    """gopsutil's common.ReadLines: split on newlines, no trailing empty line."""
    text = _read_text(path)
    if text is None:
        return None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


# ---------------------------------------------------------------------------------------
# Platform


class Platform(msgspec.Struct, frozen=True):
    platform: str
    platform_family: str
    platform_version: str


# gopsutil's family table (its current one: a superset of v3.21.8's, which lacked only a
# few newer ids such as almalinux). Unlisted platforms get an empty family, as in v3.
_FAMILIES: dict[str, str] = {
    **dict.fromkeys(
        ("debian", "ubuntu", "linuxmint", "raspbian", "Kylin", "cumuluslinux", "uos", "Deepin"),
        "debian",
    ),
    "fedora": "fedora",
    **dict.fromkeys(
        (
            "oracle", "centos", "redhat", "scientific", "enterpriseenterprise", "amazon",
            "xenserver", "cloudlinux", "ibm_powerkvm", "rocky", "almalinux",
        ),
        "rhel",
    ),
    **dict.fromkeys(
        (
            "suse", "opensuse", "opensuse-leap", "opensuse-tumbleweed",
            "opensuse-tumbleweed-kubic", "sles", "sled", "caasp",
        ),
        "suse",
    ),
    **{name: name for name in ("gentoo", "slackware", "arch", "exherbo", "alpine", "coreos",
                               "solus", "neokylin", "anolis")},
}

# DISTRIB_ID values that gopsutil maps to their own platform on a debian_version host.
_DEBIAN_LSB_PLATFORMS = {
    "Ubuntu": "ubuntu",
    "LinuxMint": "linuxmint",
    "Kylin": "Kylin",
    "Cumulus Linux": "cumuluslinux",
    "uos": "uos",
    "Deepin": "Deepin",
}
# Platform for a DISTRIB_ID when no release file decided (the last resort in gopsutil).
_LSB_ONLY_PLATFORMS = {
    "RedHat": "redhat",
    "Amazon": "amazon",
    "ScientificSL": "scientific",
    "XenServer": "xenserver",
}

_REDHATISH_RELEASE = re.compile(r"release (\w[\d.]*)")
_SUSE_VERSION = re.compile(r"VERSION = ([\d.]+)")
_SUSE_PATCHLEVEL = re.compile(r"PATCHLEVEL = (\d+)")


def _trim_quotes(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return value[1:-1]
    return value


def _key_values(lines: Iterable[str]) -> dict[str, str]:
    """``KEY=value`` lines as gopsutil splits them: the value ends at the next ``=``."""
    fields: dict[str, str] = {}
    for line in lines:
        parts = line.split("=")
        if len(parts) >= 2:
            fields[parts[0]] = parts[1]
    return fields


def _lsb(etc: Path) -> tuple[str, str]:
    """(DISTRIB_ID, DISTRIB_RELEASE) from /etc/lsb-release, quotes removed.

    gopsutil also runs /usr/bin/lsb_release when the file is missing; that tool reads the
    same data on the distributions it matters for (Ubuntu, Mint ship the file), so we don't.
    """
    fields = _key_values(_read_lines(etc / "lsb-release") or ())
    return (
        fields.get("DISTRIB_ID", "").replace('"', ""),
        fields.get("DISTRIB_RELEASE", "").replace('"', ""),
    )


def _redhatish_version(lines: Sequence[str]) -> str:
    text = "".join(lines).lower()
    if "rawhide" in text:
        return "rawhide"
    match = _REDHATISH_RELEASE.search(text)
    return match.group(1) if match else ""


def _redhatish_platform(lines: Sequence[str]) -> str:
    text = "".join(lines).lower()
    return "redhat" if "red hat" in text else text.split(" ")[0]


def _suse_version(lines: Sequence[str]) -> str:
    version = ""
    for line in lines:
        if match := _SUSE_VERSION.search(line):
            version = match.group(1)
        elif match := _SUSE_PATCHLEVEL.search(line):
            version = f"{version}.{match.group(1)}"
    return version


def _os_release(etc: Path) -> tuple[str, str]:
    """(ID, VERSION) from /etc/os-release like gopsutil v3.21.8.

    v3.21.8 reads VERSION; we fall back to VERSION_ID where VERSION is absent (Tumbleweed),
    where Go reports an empty version.
    """
    fields = _key_values(_read_lines(etc / "os-release") or ())
    platform = _trim_quotes(fields.get("ID", ""))
    version = _trim_quotes(fields.get("VERSION", fields.get("VERSION_ID", "")))
    # gopsutil cleans up Amazon's os-release ID to the name its release files give.
    return ("amazon" if platform == "amzn" else platform), version


def _platform_and_version(root: Path) -> tuple[str, str]:
    etc = under_root(root, "/etc")
    lsb_id, lsb_release = _lsb(etc)

    def lines(name: str) -> list[str]:
        return _read_lines(etc / name) or []

    # The release files in gopsutil's order: the first one present decides.
    if (etc / "oracle-release").exists():
        return "oracle", _redhatish_version(lines("oracle-release"))
    if (etc / "enterprise-release").exists():
        return "oracle", _redhatish_version(lines("enterprise-release"))
    if (etc / "slackware-version").exists():
        text = "".join(lines("slackware-version")).lower()
        return "slackware", text.replace("slackware ", "", 1)
    if (etc / "debian_version").exists():
        if lsb_id in _DEBIAN_LSB_PLATFORMS:
            return _DEBIAN_LSB_PLATFORMS[lsb_id], lsb_release
        raspbian = under_root(root, "/usr/bin/raspi-config").exists()
        first = lines("debian_version")[:1]
        return ("raspbian" if raspbian else "debian"), (first[0] if first else "")
    for name in ("redhat-release", "system-release"):
        if (etc / name).exists():
            content = lines(name)
            return _redhatish_platform(content), _redhatish_version(content)
    if (etc / "gentoo-release").exists():
        return "gentoo", _redhatish_version(lines("gentoo-release"))
    if (etc / "SuSE-release").exists():
        content = lines("SuSE-release")
        platform = "opensuse" if "opensuse" in "".join(content).lower() else "suse"
        return platform, _suse_version(content)
    if (etc / "arch-release").exists():
        return "arch", lsb_release
    if (etc / "alpine-release").exists():
        first = lines("alpine-release")[:1]
        return "alpine", (first[0] if first else "")
    if (etc / "os-release").exists():
        return _os_release(etc)
    if lsb_id in _LSB_ONLY_PLATFORMS:
        return _LSB_ONLY_PLATFORMS[lsb_id], lsb_release
    return lsb_id.lower(), lsb_release


def read_platform(root: Path = ROOT) -> Platform:
    """platform, platform_family, platform_version as gopsutil reports them."""
    platform, version = _platform_and_version(root)
    platform = platform.strip('"')
    return Platform(platform, _FAMILIES.get(platform, ""), version)


# ---------------------------------------------------------------------------------------
# Kernel facts


def kernel_version() -> str:
    return os.uname().release


def arch() -> str:
    """uname machine (x86_64, aarch64), like gopsutil's KernelArch."""
    return os.uname().machine


def hostname() -> str:
    return socket.gethostname()


# ---------------------------------------------------------------------------------------
# IP lists

MAX_PRIVATE_PER_FAMILY = 5
_SKIPPED_IFACE_PREFIXES = ("docker", "lo")
_PRIVATE_V4 = tuple(
    ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
)
_BROADCAST_V4 = ipaddress.IPv4Address("255.255.255.255")


class IpLists(msgspec.Struct, frozen=True):
    intranet_ipv4: tuple[str, ...] = ()
    extranet_ipv4: tuple[str, ...] = ()
    intranet_ipv6: tuple[str, ...] = ()
    extranet_ipv6: tuple[str, ...] = ()


def _global_unicast(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Go's net.IP.IsGlobalUnicast: private ranges count, link-local etc. do not."""
    return not (
        ip.is_unspecified
        or ip.is_loopback
        or ip.is_multicast
        or ip.is_link_local
        or ip == _BROADCAST_V4
    )


def classify_addresses(iface_addrs: Mapping[str, Sequence[str]]) -> IpLists:
    """Sort interface addresses into the header's four lists, like the Go agent.

    Addresses may carry a ``%zone`` suffix (as psutil gives IPv6 link-local ones).
    Only the private lists are capped, as in the Go agent. Unlike the Go agent, whose
    172 test is ``second byte & 0x10``, IPv4 private means exactly 172.16.0.0/12.
    """
    v4_private: list[str] = []
    v4_public: list[str] = []
    v6_private: list[str] = []
    v6_public: list[str] = []
    for iface, addrs in iface_addrs.items():
        if iface.startswith(_SKIPPED_IFACE_PREFIXES):
            continue
        for text in addrs:
            try:
                ip = ipaddress.ip_address(text.split("%", 1)[0])
            except ValueError:
                continue
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped  # Go treats ::ffff:a.b.c.d as IPv4
            if not _global_unicast(ip):
                continue
            if isinstance(ip, ipaddress.IPv4Address):
                private = any(ip in net for net in _PRIVATE_V4)
                (v4_private if private else v4_public).append(str(ip))
            else:
                private = ip.packed[0] == 0xFD
                (v6_private if private else v6_public).append(str(ip))
    return IpLists(
        intranet_ipv4=tuple(v4_private[:MAX_PRIVATE_PER_FAMILY]),
        extranet_ipv4=tuple(v4_public),
        intranet_ipv6=tuple(v6_private[:MAX_PRIVATE_PER_FAMILY]),
        extranet_ipv6=tuple(v6_public),
    )


def ip_lists() -> IpLists:
    """The IP lists of this host's interfaces."""
    families = (socket.AF_INET, socket.AF_INET6)
    return classify_addresses(
        {
            iface: [a.address for a in addrs if a.family in families]
            for iface, addrs in psutil.net_if_addrs().items()
        }
    )


# ---------------------------------------------------------------------------------------
# Files under /proc, /sys and /etc

_DMI = "/sys/class/dmi/id"
_RTF_UP = 0x1
_RTF_GATEWAY = 0x2


def dmi_field(root: Path, name: str) -> str:
    """A trimmed /sys/class/dmi/id file (product_serial is root-only), "" if unreadable."""
    text = _read_text(under_root(root, _DMI) / name)
    return "" if text is None else text.strip()


def dns_servers(root: Path = ROOT) -> str:
    """Comma list of the nameservers in /etc/resolv.conf."""
    servers = []
    for line in _read_lines(under_root(root, "/etc/resolv.conf")) or ():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            servers.append(words[1])
    return ",".join(servers)


def default_gateway(root: Path = ROOT) -> str:
    """The gateway of the default IPv4 route in /proc/net/route, "" if none."""
    for line in _scan_lines(under_root(root, "/proc/net/route")):
        fields = line.split()
        if len(fields) < 4 or fields[1] != "00000000":
            continue
        try:
            flags = int(fields[3], 16)
            gateway = bytes.fromhex(fields[2])
        except ValueError:
            continue
        if flags & _RTF_UP and flags & _RTF_GATEWAY and len(gateway) == 4:
            # The kernel prints the address in host byte order: little-endian here.
            return str(ipaddress.IPv4Address(gateway[::-1]))
    return ""


# ARM cores by (implementer, part) as /proc/cpuinfo gives them; arm64 kernels print no
# "model name", and these cover the common server CPUs (Graviton, Ampere, Kunpeng).
_ARM_CORES = {
    ("0x41", "0xd03"): "Cortex-A53",
    ("0x41", "0xd07"): "Cortex-A57",
    ("0x41", "0xd08"): "Cortex-A72",
    ("0x41", "0xd0b"): "Cortex-A76",
    ("0x41", "0xd0c"): "Neoverse-N1",
    ("0x41", "0xd40"): "Neoverse-V1",
    ("0x41", "0xd49"): "Neoverse-N2",
    ("0x41", "0xd4f"): "Neoverse-V2",
    ("0x48", "0xd01"): "Kunpeng-920",
    ("0xc0", "0xac3"): "Ampere-1",
}
# Other name keys, in order: 32-bit ARM, MIPS, POWER.
_CPU_NAME_KEYS = ("model name", "Processor", "cpu model", "cpu")


def _cpuinfo_first_values(lines: Iterable[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep:
            values.setdefault(key.strip(), value.strip())
    return values


def cpu_name(root: Path = ROOT) -> str:
    """The CPU model from /proc/cpuinfo; on arm64 the core name from implementer/part."""
    values = _cpuinfo_first_values(_scan_lines(under_root(root, "/proc/cpuinfo")))
    if values.get("model name"):
        return values["model name"]
    implementer = values.get("CPU implementer", "").lower()
    part = values.get("CPU part", "").lower()
    if implementer and part:
        return _ARM_CORES.get((implementer, part), f"ARM implementer {implementer} part {part}")
    for key in _CPU_NAME_KEYS[1:]:
        if values.get(key):
            return values[key]
    return ""


def boot_time(root: Path = ROOT) -> int:
    """btime from /proc/stat (unix seconds), 0 if unknown."""
    for line in _scan_lines(under_root(root, "/proc/stat")):
        fields = line.split()
        if len(fields) == 2 and fields[0] == "btime" and fields[1].isdigit():
            return int(fields[1])
    return 0


# ---------------------------------------------------------------------------------------
# Everything the heartbeat and the header need about the host


class HostFacts(msgspec.Struct, frozen=True):
    """Facts that change rarely: read at start and again on each heartbeat tick."""

    hostname: str
    kernel_version: str
    arch: str
    platform: Platform
    ips: IpLists
    host_serial: str
    host_id: str
    host_model: str
    host_vendor: str
    dns: str
    gateway: str
    cpu_name: str
    boot_time: int


def read_host_facts(root: Path = ROOT) -> HostFacts:
    return HostFacts(
        hostname=hostname(),
        kernel_version=kernel_version(),
        arch=arch(),
        platform=read_platform(root),
        ips=ip_lists(),
        host_serial=dmi_field(root, "product_serial"),
        host_id=dmi_field(root, "product_uuid"),
        host_model=dmi_field(root, "product_name"),
        host_vendor=dmi_field(root, "sys_vendor"),
        dns=dns_servers(root),
        gateway=default_gateway(root),
        cpu_name=cpu_name(root),
        boot_time=boot_time(root),
    )
