"""Host facts against real release files, /proc snippets and the capture VM's values."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import psutil
import pytest

from elkeid_agent.host import (
    IpLists,
    Platform,
    arch,
    boot_time,
    classify_addresses,
    cpu_name,
    default_gateway,
    dmi_field,
    dns_servers,
    ip_lists,
    kernel_version,
    read_host_facts,
    read_platform,
    under_root,
)

DATA = Path(__file__).parent / "data"
OS_RELEASE = DATA / "os-release"

# (platform, family, version) as gopsutil v3.21.8's PlatformInformation gives them.
PLATFORMS = {
    "debian-12": ("debian", "debian", "12.11"),
    "raspbian-12": ("raspbian", "debian", "12.5"),
    "ubuntu-22.04": ("ubuntu", "debian", "22.04"),
    "centos-7": ("centos", "rhel", "7.9.2009"),
    "centos-stream-9": ("centos", "rhel", "9"),
    "rhel-7": ("redhat", "rhel", "7.9"),
    "rhel-9": ("redhat", "rhel", "9.3"),
    "rocky-9": ("rocky", "rhel", "9.3"),
    "almalinux-9": ("almalinux", "rhel", "9.3"),
    "oracle-8": ("oracle", "rhel", "8.9"),
    "amzn-2": ("amazon", "rhel", "2"),
    "amzn-2023": ("amazon", "rhel", "2023.6.20241010"),
    "amzn-os-release-only": ("amazon", "rhel", "2023"),
    "fedora-39": ("fedora", "fedora", "39"),
    # Leap 15 has no SuSE-release: gopsutil reports the os-release ID as is.
    "opensuse-leap-15.5": ("opensuse-leap", "suse", "15.5"),
    "opensuse-42.3": ("opensuse", "suse", "42.3"),
    # No VERSION line: gopsutil gives "", we fall back to VERSION_ID.
    "opensuse-tumbleweed": ("opensuse-tumbleweed", "suse", "20240101"),
    "sles-12": ("suse", "suse", "12.5"),
    "alpine-3.19": ("alpine", "alpine", "3.19.1"),
    "arch": ("arch", "arch", ""),
}


def test_every_fixture_tree_has_an_expectation() -> None:
    assert sorted(p.name for p in OS_RELEASE.iterdir()) == sorted(PLATFORMS)


@pytest.mark.parametrize("distro", sorted(PLATFORMS))
def test_read_platform(distro: str) -> None:
    assert read_platform(OS_RELEASE / distro) == Platform(*PLATFORMS[distro])


def test_read_platform_of_an_empty_tree(tmp_path: Path) -> None:
    assert read_platform(tmp_path) == Platform("", "", "")


def test_lsb_release_alone_names_the_platform(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/lsb-release").write_text("DISTRIB_ID=RedHat\nDISTRIB_RELEASE=6.10\n")
    assert read_platform(tmp_path) == Platform("redhat", "rhel", "6.10")
    (tmp_path / "etc/lsb-release").write_text('DISTRIB_ID="Exherbo"\nDISTRIB_RELEASE=1\n')
    assert read_platform(tmp_path) == Platform("exherbo", "exherbo", "1")


def test_unknown_os_release_id_has_no_family(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/os-release").write_text('ID=nixos\nVERSION="23.11 (Tapir)"\n')
    assert read_platform(tmp_path) == Platform("nixos", "", "23.11 (Tapir)")


def test_under_root_maps_absolute_host_paths(tmp_path: Path) -> None:
    assert under_root(tmp_path, "/etc/elkeid") == tmp_path / "etc/elkeid"
    assert under_root(Path("/"), Path("/etc")) == Path("/etc")
    with pytest.raises(ValueError, match="absolute"):
        under_root(tmp_path, "etc")


def test_kernel_facts_match_uname() -> None:
    uname = os.uname()
    assert kernel_version() == uname.release
    assert arch() == uname.machine
    assert arch() in {"x86_64", "aarch64"}


# ---------------------------------------------------------------------------------------
# IP lists


def test_classify_capture_vm_addresses() -> None:
    # The capture VM of the Go fixtures: 192.0.2.2 went to extranet, fd00::2 to intranet.
    lists = classify_addresses(
        {
            "lo": ["127.0.0.1", "::1"],
            "eth0": ["192.0.2.2", "fd00::2", "fe80::5054:ff:fe12:3456%eth0"],
        }
    )
    assert lists == IpLists(extranet_ipv4=("192.0.2.2",), intranet_ipv6=("fd00::2",))


def test_classify_skips_docker_and_lo_prefixed_interfaces() -> None:
    lists = classify_addresses(
        {"docker0": ["172.17.0.1"], "lo:1": ["10.1.1.1"], "eth0": ["10.0.0.5"]}
    )
    assert lists == IpLists(intranet_ipv4=("10.0.0.5",))


@pytest.mark.parametrize(
    "address",
    [
        "0.0.0.0",
        "127.0.0.2",
        "169.254.1.1",
        "224.0.0.1",
        "255.255.255.255",
        "::",
        "::1",
        "fe80::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "not-an-ip",
    ],
)
def test_classify_drops_what_is_not_global_unicast(address: str) -> None:
    assert classify_addresses({"eth0": [address]}) == IpLists()


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.255.0.1", IpLists(intranet_ipv4=("10.255.0.1",))),
        ("172.16.0.1", IpLists(intranet_ipv4=("172.16.0.1",))),
        ("172.31.255.254", IpLists(intranet_ipv4=("172.31.255.254",))),
        ("172.15.0.1", IpLists(extranet_ipv4=("172.15.0.1",))),
        ("172.32.0.1", IpLists(extranet_ipv4=("172.32.0.1",))),
        # The Go agent's `b & 0x10` test calls this private; it is not.
        ("172.48.0.1", IpLists(extranet_ipv4=("172.48.0.1",))),
        ("192.168.1.1", IpLists(intranet_ipv4=("192.168.1.1",))),
        ("192.169.1.1", IpLists(extranet_ipv4=("192.169.1.1",))),
        ("100.64.0.1", IpLists(extranet_ipv4=("100.64.0.1",))),
        ("::ffff:10.0.0.1", IpLists(intranet_ipv4=("10.0.0.1",))),
        ("fd12:3456::1", IpLists(intranet_ipv6=("fd12:3456::1",))),
        ("fc00::1", IpLists(extranet_ipv6=("fc00::1",))),
        ("2001:db8::1", IpLists(extranet_ipv6=("2001:db8::1",))),
        ("2001:DB8:0:0:1::1", IpLists(extranet_ipv6=("2001:db8::1:0:0:1",))),
    ],
)
def test_classify_private_and_public(address: str, expected: IpLists) -> None:
    assert classify_addresses({"eth0": [address]}) == expected


def test_only_private_lists_are_capped_at_five() -> None:
    v4_private = [f"10.0.0.{i}" for i in range(1, 9)]
    v4_public = [f"8.8.8.{i}" for i in range(1, 9)]
    v6_private = [f"fd00::{i}" for i in range(1, 9)]
    v6_public = [f"2001:db8::{i}" for i in range(1, 9)]
    lists = classify_addresses(
        {"eth0": v4_private + v6_private, "eth1": v4_public + v6_public}
    )
    assert lists.intranet_ipv4 == tuple(v4_private[:5])
    assert lists.intranet_ipv6 == tuple(v6_private[:5])
    assert lists.extranet_ipv4 == tuple(v4_public)
    assert lists.extranet_ipv6 == tuple(v6_public)


def test_ip_lists_of_this_host_agree_with_psutil() -> None:
    lists = ip_lists()
    seen = {
        a.address.split("%")[0]
        for name, addrs in psutil.net_if_addrs().items()
        if not name.startswith(("lo", "docker"))
        for a in addrs
        if a.family in (socket.AF_INET, socket.AF_INET6)
    }
    reported = [
        *lists.intranet_ipv4, *lists.extranet_ipv4, *lists.intranet_ipv6, *lists.extranet_ipv6
    ]
    assert set(reported) <= seen
    assert "127.0.0.1" not in reported


# ---------------------------------------------------------------------------------------
# /proc, /sys and /etc files


def write(root: Path, rel: str, content: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)


def test_dmi_fields_are_trimmed_and_empty_when_missing(tmp_path: Path) -> None:
    write(tmp_path, "sys/class/dmi/id/product_name", "PowerEdge R740\n")
    write(tmp_path, "sys/class/dmi/id/sys_vendor", "  Dell Inc.  \n")
    assert dmi_field(tmp_path, "product_name") == "PowerEdge R740"
    assert dmi_field(tmp_path, "sys_vendor") == "Dell Inc."
    assert dmi_field(tmp_path, "product_serial") == ""


def test_dns_servers_from_resolv_conf(tmp_path: Path) -> None:
    write(
        tmp_path,
        "etc/resolv.conf",
        "# generated\nsearch example.com\nnameserver 10.255.255.53\n"
        "nameserver\tfd00::53 # v6\noptions edns0\n;nameserver 9.9.9.9\nnameserver\n",
    )
    assert dns_servers(tmp_path) == "10.255.255.53,fd00::53"
    assert dns_servers(tmp_path / "nothing") == ""


ROUTE_HEADER = (
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
)


def test_default_gateway_is_little_endian(tmp_path: Path) -> None:
    write(
        tmp_path,
        "proc/net/route",
        ROUTE_HEADER
        + "eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        + "eth1\t00000A0A\t0102000A\t0003\t0\t0\t0\t0000FFFF\t0\t0\t0\n"
        + "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n",
    )
    assert default_gateway(tmp_path) == "192.0.2.1"


def test_default_gateway_ignores_down_and_direct_routes(tmp_path: Path) -> None:
    write(
        tmp_path,
        "proc/net/route",
        ROUTE_HEADER
        + "eth0\t00000000\t010200C0\t0002\t0\t0\t0\t00000000\t0\t0\t0\n"  # not up
        + "eth0\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0\n",  # no gateway
    )
    assert default_gateway(tmp_path) == ""
    assert default_gateway(tmp_path / "nothing") == ""


@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        ("x86_64", "Intel(R) Xeon(R) Platinum 8259CL CPU @ 2.50GHz"),
        ("aarch64-graviton2", "Neoverse-N1"),
        ("aarch64-unknown-core", "ARM implementer 0x61 part 0x023"),
        ("ppc64le-power9", "POWER9 (architected), altivec supported"),
    ],
)
def test_cpu_name(tmp_path: Path, sample: str, expected: str) -> None:
    (tmp_path / "proc").mkdir()
    shutil.copy(DATA / "cpuinfo" / sample, tmp_path / "proc/cpuinfo")
    assert cpu_name(tmp_path) == expected


def test_cpu_name_without_cpuinfo_is_empty(tmp_path: Path) -> None:
    assert cpu_name(tmp_path) == ""


def test_boot_time_from_proc_stat(tmp_path: Path) -> None:
    write(
        tmp_path,
        "proc/stat",
        "cpu  1 2 3 4 5 6 7 0 0 0\nintr 12345\nctxt 999\nbtime 1795703741\nprocesses 20\n",
    )
    assert boot_time(tmp_path) == 1795703741
    assert boot_time(tmp_path / "nothing") == 0


def test_boot_time_of_this_host_matches_psutil() -> None:
    assert abs(boot_time() - psutil.boot_time()) <= 1


def test_read_host_facts_from_a_fake_tree(tmp_path: Path) -> None:
    shutil.copytree(OS_RELEASE / "rocky-9", tmp_path, dirs_exist_ok=True)
    write(tmp_path, "sys/class/dmi/id/product_uuid", "EC2A3B1C-7D2E-4F10-9A8B-0C1D2E3F4A5B\n")
    write(tmp_path, "sys/class/dmi/id/product_serial", "ec2a3b1c\n")
    write(tmp_path, "sys/class/dmi/id/product_name", "m5.large\n")
    write(tmp_path, "sys/class/dmi/id/sys_vendor", "Amazon EC2\n")
    write(tmp_path, "etc/resolv.conf", "nameserver 169.254.169.253\n")
    write(tmp_path, "proc/stat", "btime 1700000000\n")
    facts = read_host_facts(tmp_path)
    assert facts.platform == Platform("rocky", "rhel", "9.3")
    assert (facts.host_id, facts.host_serial, facts.host_model, facts.host_vendor) == (
        "EC2A3B1C-7D2E-4F10-9A8B-0C1D2E3F4A5B",
        "ec2a3b1c",
        "m5.large",
        "Amazon EC2",
    )
    assert facts.dns == "169.254.169.253"
    assert facts.gateway == ""
    assert facts.cpu_name == ""
    assert facts.boot_time == 1700000000
    assert facts.hostname == socket.gethostname()
    assert facts.kernel_version == os.uname().release
