"""Issue 9, the disk: the agent's work dir on a small tmpfs this module mounts (root only). A full
or read-only work dir fails the writes that need it, and only those: heartbeats go on while it
lasts (state may be abnormal), and once space or write access returns the agent recovers.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultrig import BASE, BASE_EXE, MIB, Rig, case, sh_plugin, sha
from hostile import Progress, stream

SIZE = 16 * MIB
BIG = 64 * MIB
HOLD_SECONDS = 3.0
PLUGIN = sh_plugin("exec cat <&3 >/dev/null")


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def mnt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("the disk cases mount a tmpfs: run the suite as root")
    path = tmp_path_factory.mktemp("fault-disk-mnt")
    _mount("-t", "tmpfs", "-o", f"size={SIZE},mode=0755", "tmpfs", str(path))
    try:
        yield path
    finally:
        result = subprocess.run(["umount", "-R", str(path)], check=False, capture_output=True)
        if result.returncode:
            subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, mnt: Path) -> Iterator[Rig]:
    with Rig(tmp_path_factory.mktemp("fault-disk"), work_dir=mnt / "work") as rig:
        yield rig


@pytest.fixture
def rig(shared: Rig, mnt: Path) -> Iterator[Rig]:
    try:
        yield from case(shared)
    finally:
        if os.path.ismount(shared.work):
            _mount("-o", "remount,bind,rw", str(shared.work))
        (mnt / "filler").unlink(missing_ok=True)


def _fill(path: Path) -> None:
    """Take every free byte of the filesystem (down to 4 KiB), with unbuffered writes."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            return
        raise
    try:
        for block in (b"\0" * MIB, b"\0" * 4096):
            with contextlib.suppress(OSError):
                while os.write(fd, block):
                    pass
    finally:
        os.close(fd)


def _recovers(rig: Rig, name: str) -> None:
    """With the disk usable again, a plugin installs and the agent is `running` again."""
    since = time.time()
    rig.center.send_configs([rig.publish(BASE, BASE_EXE), rig.publish(name, PLUGIN)])
    rig.plugin_beat_after(since, name, timeout=20)
    rig.wait(
        lambda: [b for b in rig.beats(since) if b.fields["state"] == "running"],
        20,
        "a heartbeat with state running after the disk came back",
    )


def test_the_work_dir_fills_while_a_plugin_downloads(rig: Rig, mnt: Path) -> None:
    gate = threading.Event()
    progress = Progress()
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG
    rig.hostile.routes["/big"] = stream(BIG, progress, head, gate)
    since = time.time()
    entry = {
        "name": "big",
        "version": "1",
        "sha256": sha(b"\xa5" * BIG),
        "download_urls": [rig.hostile.url("/big")],
    }
    rig.center.send_configs([rig.publish(BASE, BASE_EXE), entry])
    rig.wait(lambda: progress.sent > 0, 10, "the download to start")
    filler = mnt / "filler"
    try:
        _fill(filler)
        gate.set()  # the rest of the body now meets a full disk
        rig.wait(progress.done.is_set, 20, "the download to end")
        time.sleep(0.5)
        _fill(filler)  # and whatever the failed download gave back
        full_since = time.time()
        time.sleep(HOLD_SECONDS)
        rig.check_alive()
        held = rig.beats(full_since)
        assert len(held) >= 2, f"{len(held)} heartbeats in {HOLD_SECONDS} s of a full disk"
        rig.detail_after(since, "big")
        rig.survived()
    finally:
        gate.set()
        filler.unlink(missing_ok=True)
    _recovers(rig, "afterfull")
    rig.survived()


def test_a_read_only_work_dir(rig: Rig) -> None:
    # A read-only bind mount over the work dir: remounting the tmpfs itself read-only is
    # refused while the agent holds its log open for writing; the bind has no writers yet.
    _mount("--bind", str(rig.work), str(rig.work))
    _mount("-o", "remount,bind,ro", str(rig.work))
    since = time.time()
    rig.center.send_configs([rig.publish(BASE, BASE_EXE), rig.publish("ro1", PLUGIN)])
    time.sleep(HOLD_SECONDS)
    rig.check_alive()
    held = rig.beats(since)
    assert len(held) >= 2, f"{len(held)} heartbeats in {HOLD_SECONDS} s of a read-only work dir"
    rig.detail_after(since, "ro1")
    rig.survived()
    _mount("-o", "remount,bind,rw", str(rig.work))
    _recovers(rig, "afterro")
    rig.survived()
