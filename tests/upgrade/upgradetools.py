"""Builders of real artifacts for the upgrade tests: tar.gz with tarfile, .deb with
dpkg-deb (and a hand-written ar writer for hostile ones), .rpm with rpmbuild."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

SCRIPT = b"#!/bin/sh\necho B\n"


def make_tar_gz(path: Path, members: list[tuple[str, bytes | None, str]]) -> Path:
    """members: (name, data, kind), kind file|symlink|dir|fifo; a symlink's data: its target."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                assert data is not None
                info.size = len(data)
                info.mode = 0o755
                tar.addfile(info, io.BytesIO(data))
            elif kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = (data or b"/etc/shadow").decode()
                tar.addfile(info)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
                tar.addfile(info)
    return path


def ar_archive(members: list[tuple[str, bytes]]) -> bytes:
    """A System V/GNU ar archive, as dpkg writes a .deb."""
    out = [b"!<arch>\n"]
    for name, data in members:
        header = (
            f"{name:<16}{0:<12}{0:<6}{0:<6}{0o100644:<8o}{len(data):<10}".encode() + b"`\n"
        )
        assert len(header) == 60
        out.append(header + data + (b"\n" if len(data) % 2 else b""))
    return b"".join(out)


def tar_bytes(members: list[tuple[str, bytes | None, str]], compression: str) -> bytes:
    buf = io.BytesIO()
    mode = {"gz": "w:gz", "xz": "w:xz", "": "w"}[compression]
    with tarfile.open(fileobj=buf, mode=mode) as tar:  # type: ignore[call-overload]
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                assert data is not None
                info.size, info.mode = len(data), 0o700
                tar.addfile(info, io.BytesIO(data))
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/bin/sh"
                tar.addfile(info)
            else:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
    return buf.getvalue()


def make_deb_by_hand(
    path: Path, members: list[tuple[str, bytes | None, str]], compression: str = "gz"
) -> Path:
    control = tar_bytes([("./control", b"Package: elkeid-agent\n", "file")], "gz")
    data = tar_bytes(members, compression)
    suffix = f".{compression}" if compression else ""
    path.write_bytes(
        ar_archive([("debian-binary", b"2.0\n"), ("control.tar.gz", control),
                    (f"data.tar{suffix}", data)])
    )
    return path


def make_deb(
    path: Path, executable: bytes, version: str = "2.0", compression: str = "gzip"
) -> Path:
    """A real .deb from dpkg-deb --build holding /etc/elkeid/elkeid-agent."""
    root = path.parent / f"debroot-{path.stem}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: elkeid-agent\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: t <t@localhost>\nDescription: test\n"
    )
    target = root / "etc" / "elkeid" / "elkeid-agent"
    target.parent.mkdir(parents=True)
    target.write_bytes(executable)
    target.chmod(0o700)
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", f"-Z{compression}", "--build", str(root), str(path)],
        check=True, capture_output=True,
    )
    shutil.rmtree(root)
    return path


def make_rpm(
    path: Path, executable: bytes, payload: str = "w9.gzdio", symlink: bool = False
) -> Path:
    """A real .rpm from rpmbuild; `payload` is rpm's _binary_payload (gzdio, xzdio...)."""
    top = path.parent / f"rpmtop-{path.stem}"
    (top / "SPECS").mkdir(parents=True)
    source = top / "agent.bin"
    source.write_bytes(executable)
    install = (
        "ln -s /bin/sh %{buildroot}/etc/elkeid/elkeid-agent" if symlink
        else f"install -m 0700 {source} %{{buildroot}}/etc/elkeid/elkeid-agent"
    )
    spec = top / "SPECS" / "a.spec"
    spec.write_text(
        "Name: elkeid-agent\nVersion: 2.0\nRelease: 1\nSummary: t\nLicense: x\n"
        "BuildArch: noarch\n"
        f"%define _binary_payload {payload}\n%define __os_install_post %{{nil}}\n"
        "%description\nt\n%install\nmkdir -p %{buildroot}/etc/elkeid\n"
        f"{install}\n%files\n/etc/elkeid/elkeid-agent\n"
    )
    subprocess.run(
        ["rpmbuild", "--define", f"_topdir {top}", "-bb", str(spec)],
        check=True, capture_output=True,
    )
    built = next((top / "RPMS").rglob("*.rpm"))
    shutil.move(built, path)
    shutil.rmtree(top)
    return path


need_rpmbuild = pytest.mark.skipif(shutil.which("rpmbuild") is None,
                                   reason="rpmbuild is not installed")
need_dpkg_deb = pytest.mark.skipif(shutil.which("dpkg-deb") is None,
                                   reason="dpkg-deb is not installed")
