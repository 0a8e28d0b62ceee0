"""Candidate extraction from real archives built here, and from hostile ones."""

from __future__ import annotations

import gzip
import io
import lzma
import time
import tracemalloc
from pathlib import Path

import pytest
from floods import member_flood_tar_gz
from upgradetools import (
    SCRIPT,
    ar_archive,
    make_deb,
    make_deb_by_hand,
    make_rpm,
    make_tar_gz,
    need_dpkg_deb,
    need_rpmbuild,
)

from elkeid_agent.upgrade.artifact import (
    MAX_MEMBERS,
    MEMBER_CAP_COUNTER,
    SIZE_CAP_COUNTER,
    ArtifactKind,
    BadArtifact,
    detect,
    extract_candidate,
    is_member_path,
)

ELF_HEAD = b"\x7fELF\x02\x01\x01" + b"\x00" * 9


def extract(path: Path, **caps: int) -> tuple[ArtifactKind, bytes]:
    out = io.BytesIO()
    with path.open("rb") as src:
        kind = extract_candidate(src, out, **caps)
    return kind, out.getvalue()


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("./etc/elkeid/elkeid-agent", True),
        ("etc/elkeid/elkeid-agent", True),
        ("elkeid-agent", True),
        ("./elkeid-agent", True),
        ("/etc/elkeid/elkeid-agent", False),
        ("../etc/elkeid/elkeid-agent", False),
        ("etc/elkeid/../elkeid/elkeid-agent", False),
        ("usr/bin/elkeid-agent", False),
        ("etc/elkeid/elkeid-agent.sig", False),
    ],
)
def test_member_names(name: str, ok: bool) -> None:
    assert is_member_path(name) is ok


def test_detect_by_magic() -> None:
    assert detect(b"!<arch>\ndebian") is ArtifactKind.DEB
    assert detect(b"\xed\xab\xee\xdb\x03\x00") is ArtifactKind.RPM
    assert detect(b"\x1f\x8b\x08\x00") is ArtifactKind.TAR_GZ
    assert detect(ELF_HEAD) is ArtifactKind.BARE
    assert detect(b"#!/bin/sh\n") is ArtifactKind.BARE


def test_bare_executable_is_copied(tmp_path: Path) -> None:
    path = tmp_path / "agent"
    path.write_bytes(ELF_HEAD + b"x" * 1000)
    assert extract(path) == (ArtifactKind.BARE, ELF_HEAD + b"x" * 1000)


def test_bare_executable_over_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "agent"
    path.write_bytes(b"x" * 1001)
    with pytest.raises(BadArtifact, match="larger than 1000"):
        extract(path, max_bytes=1000)


@pytest.mark.parametrize("name", ["elkeid-agent", "./etc/elkeid/elkeid-agent"])
def test_tar_gz(tmp_path: Path, name: str) -> None:
    path = make_tar_gz(tmp_path / "a.tgz", [("README", b"hello", "file"), (name, SCRIPT, "file")])
    assert extract(path) == (ArtifactKind.TAR_GZ, SCRIPT)


def test_tar_gz_without_the_member(tmp_path: Path) -> None:
    path = make_tar_gz(tmp_path / "a.tgz", [("bin/other", SCRIPT, "file")])
    with pytest.raises(BadArtifact, match="no elkeid-agent"):
        extract(path)


@pytest.mark.parametrize("kind", ["symlink", "dir", "fifo"])
def test_tar_gz_member_that_is_not_a_file(tmp_path: Path, kind: str) -> None:
    path = make_tar_gz(tmp_path / "a.tgz", [("elkeid-agent", None, kind)])
    with pytest.raises(BadArtifact, match="not a file"):
        extract(path)


def test_tar_gz_traversal_names_never_match_and_nothing_is_written(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    path = make_tar_gz(
        tmp_path / "a.tgz",
        [("../../elkeid-agent", SCRIPT, "file"), ("/etc/elkeid/elkeid-agent", SCRIPT, "file")],
    )
    with pytest.raises(BadArtifact, match="no elkeid-agent"):
        extract(path)
    assert sorted(tmp_path.iterdir()) == sorted([work, path])


def test_tar_gz_member_twice(tmp_path: Path) -> None:
    path = make_tar_gz(
        tmp_path / "a.tgz", [("elkeid-agent", SCRIPT, "file"), ("./elkeid-agent", b"x", "file")]
    )
    with pytest.raises(BadArtifact, match="twice"):
        extract(path)


def test_tar_gz_truncated(tmp_path: Path) -> None:
    path = make_tar_gz(tmp_path / "a.tgz", [("elkeid-agent", b"x" * 100_000, "file")])
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(BadArtifact):
        extract(path)


def test_tar_gz_decompression_bomb_stops_at_the_cap(tmp_path: Path) -> None:
    # 20 MB of zeros before the member compress to a few KB.
    path = make_tar_gz(
        tmp_path / "a.tgz",
        [("filler", bytes(20_000_000), "file"), ("elkeid-agent", SCRIPT, "file")],
    )
    assert path.stat().st_size < 100_000
    with pytest.raises(BadArtifact, match="larger than 1000000"):
        extract(path, max_unpacked=1_000_000)


@need_dpkg_deb
@pytest.mark.parametrize("compression", ["gzip", "xz"])
def test_deb_from_dpkg_deb(tmp_path: Path, compression: str) -> None:
    path = make_deb(tmp_path / "a.deb", SCRIPT, compression=compression)
    assert extract(path) == (ArtifactKind.DEB, SCRIPT)


@need_dpkg_deb
def test_deb_zstd_is_refused_with_the_reason(tmp_path: Path) -> None:
    path = make_deb(tmp_path / "a.deb", SCRIPT, compression="zstd")
    with pytest.raises(BadArtifact, match="zst compression is not supported"):
        extract(path)


@pytest.mark.parametrize("compression", ["gz", "xz", ""])
def test_deb_written_by_hand(tmp_path: Path, compression: str) -> None:
    members = [("./etc/", None, "dir"), ("./etc/elkeid/elkeid-agent", SCRIPT, "file")]
    path = make_deb_by_hand(tmp_path / "a.deb", members, compression)
    assert extract(path) == (ArtifactKind.DEB, SCRIPT)


def test_deb_with_a_symlink_member(tmp_path: Path) -> None:
    path = make_deb_by_hand(tmp_path / "a.deb", [("./etc/elkeid/elkeid-agent", None, "symlink")])
    with pytest.raises(BadArtifact, match="symbolic link, not a file"):
        extract(path)


def test_deb_without_data_tar(tmp_path: Path) -> None:
    path = tmp_path / "a.deb"
    path.write_bytes(ar_archive([("debian-binary", b"2.0\n"), ("control.tar.gz", b"x")]))
    with pytest.raises(BadArtifact, match=r"without data\.tar"):
        extract(path)


def test_deb_truncated(tmp_path: Path) -> None:
    members = [("./etc/elkeid/elkeid-agent", bytes(range(256)) * 400, "file")]
    path = make_deb_by_hand(tmp_path / "a.deb", members)
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(BadArtifact):
        extract(path)


@need_rpmbuild
@pytest.mark.parametrize("payload", ["w9.gzdio", "w6.xzdio", "w9.bzdio"])
def test_rpm_from_rpmbuild(tmp_path: Path, payload: str) -> None:
    body = SCRIPT + bytes(range(256)) * 50  # not a multiple of 4: exercises cpio padding
    path = make_rpm(tmp_path / "a.rpm", body, payload)
    assert extract(path) == (ArtifactKind.RPM, body)


@need_rpmbuild
def test_rpm_zstd_payload_is_refused(tmp_path: Path) -> None:
    path = make_rpm(tmp_path / "a.rpm", SCRIPT, "w19.zstdio")
    with pytest.raises(BadArtifact, match="zstd compression is not supported"):
        extract(path)


@need_rpmbuild
def test_rpm_with_a_symlink_member(tmp_path: Path) -> None:
    path = make_rpm(tmp_path / "a.rpm", SCRIPT, symlink=True)
    with pytest.raises(BadArtifact, match="symbolic link, not a file"):
        extract(path)


@need_rpmbuild
def test_rpm_truncated_payload(tmp_path: Path) -> None:
    path = make_rpm(tmp_path / "a.rpm", bytes(range(256)) * 4000)
    path.write_bytes(path.read_bytes()[:-3000])
    with pytest.raises(BadArtifact):
        extract(path)


def test_rpm_with_a_bad_header(tmp_path: Path) -> None:
    path = tmp_path / "a.rpm"
    path.write_bytes(b"\xed\xab\xee\xdb" + bytes(92) + b"\x8e\xad\xe8\x01" + bytes(4)
                     + (10**6).to_bytes(4, "big") + bytes(4))
    with pytest.raises(BadArtifact, match="header too large"):
        extract(path)


def test_compressed_garbage_is_a_bad_artifact(tmp_path: Path) -> None:
    path = tmp_path / "a.tgz"
    path.write_bytes(gzip.compress(b"not a tar at all" * 100))
    with pytest.raises(BadArtifact):
        extract(path)
    path.write_bytes(b"\x1f\x8b" + lzma.compress(b"x"))
    with pytest.raises(BadArtifact):
        extract(path)


def test_a_member_flood_is_refused_fast_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "flood.tar.gz"
    path.write_bytes(member_flood_tar_gz(100_000))
    started = time.monotonic()
    with pytest.raises(BadArtifact, match=f"more than {MAX_MEMBERS} members") as info:
        extract(path)
    assert time.monotonic() - started < 10
    assert info.value.counter == MEMBER_CAP_COUNTER
    # Again under tracemalloc (which slows tarfile several times): what it holds at the peak.
    tracemalloc.start()
    try:
        with pytest.raises(BadArtifact):
            extract(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 1024 * 1024


def test_a_size_cap_breach_names_its_counter(tmp_path: Path) -> None:
    path = make_tar_gz(
        tmp_path / "big.tar.gz",
        [("filler", b"\0" * 100_000, "file"), ("elkeid-agent", ELF_HEAD, "file")],
    )
    with pytest.raises(BadArtifact, match="larger than 50000 bytes") as info:
        extract(path, max_unpacked=50_000)
    assert info.value.counter == SIZE_CAP_COUNTER
