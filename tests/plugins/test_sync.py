"""Acceptance: sync scenarios against a real HTTP server, with real plugin processes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import ssl
import sys
import tarfile
from pathlib import Path

import pytest
from plugtools import Files, Harness, alive, files_server, run, sh_plugin, sha, tar_gz, until

from elkeid_agent.commands import ConfigSpec
from elkeid_agent.http import host_ssl_context
from elkeid_agent.plugins import process
from elkeid_agent.plugins.lifecycle import State
from elkeid_agent.plugins.supervisor import PluginSupervisor, plan_sync
from elkeid_center.certs import generate_certs, generate_server_cert


def _exe(tag: str) -> bytes:
    # Marks that it ran (the "nothing executed" checks look for the file), then serves.
    return sh_plugin(f"# {tag}\necho {tag} >> ran\nexec cat <&3 >/dev/null")


def _pid(sup: PluginSupervisor, name: str) -> int | None:
    info = sup.slot_info(name)
    return None if info is None else info[3]


async def _running(sup: PluginSupervisor, name: str) -> int:
    await until(lambda: _pid(sup, name) is not None, what=f"{name} running")
    pid = _pid(sup, name)
    assert pid is not None
    return pid


def _spec(files: Files, name: str, body: bytes, version: str, **kw: object) -> ConfigSpec:
    files.files[f"/{name}-{version}"] = body
    return ConfigSpec(
        name=name,
        version=version,
        sha256=sha(body),
        download_urls=(files.url(f"/{name}-{version}"),),
        **kw,  # type: ignore[arg-type]
    )


def test_plan_is_a_pure_diff() -> None:
    desired = [
        ConfigSpec(name="a", version="1"),
        ConfigSpec(name="b", version="2"),
        ConfigSpec(name="../x", version="1"),
        ConfigSpec(name="c", version="1"),
        ConfigSpec(name="c", version="9"),
    ]
    plan = plan_sync({"a": "1", "b": "1", "gone": "1"}, ["a", "b", "old-dir"], desired)
    assert plan.keep == ("a",)
    assert [s.name for s in plan.start] == ["b", "c"]
    assert plan.start[1].version == "1"
    assert plan.remove == ("gone", "old-dir")
    assert len(plan.rejected) == 2
    assert "'../x'" in plan.rejected[0]


def test_add_upgrade_noop_remove(tmp_path: Path) -> None:
    v1, v2 = _exe("v1"), _exe("v2")

    async def main() -> None:
        with files_server() as files:
            async with Harness(tmp_path) as h:
                sup = h.sup
                directory = tmp_path / "plugin" / "p"
                # add
                await sup.sync([_spec(files, "p", v1, "1", detail="D=1")])
                pid1 = await _running(sup, "p")
                assert (directory / "p").read_bytes() == v1
                assert sup.errors() == []
                # same version: left alone, nothing fetched
                hits = len(files.hits)
                await sup.sync([_spec(files, "p", v1, "1", detail="D=1")])
                assert _pid(sup, "p") == pid1
                assert len(files.hits) == hits
                # upgrade: new executable, new process, the old one gone
                await sup.sync([_spec(files, "p", v2, "2")])
                pid2 = await _running(sup, "p")
                assert pid2 != pid1
                await until(lambda: not alive(pid1), what="old version gone")
                assert (directory / "p").read_bytes() == v2
                # `ran` exists since v1 ran: wait for v2's line, which its process writes first.
                ran = directory / "ran"
                await until(lambda: ran.read_text() != "v1\n", what="v2 ran")
                assert ran.read_text() == "v1\nv2\n"
                assert not list(directory.glob(".download-*"))
                # removal: process and directory gone
                await sup.sync([])
                await until(lambda: not alive(pid2), what="removed plugin gone")
                assert not directory.exists()
                assert sup.slot_info("p") is None

    run(main())


def test_detail_and_environment(tmp_path: Path) -> None:
    exe = sh_plugin("env > env.txt\nexec cat <&3 >/dev/null")

    async def main() -> None:
        with files_server() as files:
            async with Harness(tmp_path) as h:
                await h.sup.sync([_spec(files, "e", exe, "1", detail="SKIP=6,7")])
                await _running(h.sup, "e")
                out = tmp_path / "plugin" / "e" / "env.txt"
                await until(lambda: out.exists() and out.stat().st_size > 0)

    run(main())
    env = dict(
        line.split("=", 1)
        for line in (tmp_path / "plugin/e/env.txt").read_text().splitlines()
        if "=" in line
    )
    assert env["DETAIL"] == "SKIP=6,7"
    assert env["ELKEID_PLUGIN_HIGH_PRIORITY_PIPE"] == "1"
    assert not any(k.startswith(("_MEI", "_PYI")) for k in env)


def test_bad_sha256_uses_the_next_url(tmp_path: Path) -> None:
    good = _exe("good")

    async def main() -> None:
        with files_server() as files:
            files.files["/bad"] = b"#!/bin/sh\necho evil > evil\n"
            spec = _spec(files, "n", good, "1")
            spec = ConfigSpec(
                name="n",
                version="1",
                sha256=spec.sha256,
                download_urls=(files.url("/missing"), files.url("/bad"), *spec.download_urls),
            )
            async with Harness(tmp_path) as h:
                await h.sup.sync([spec])
                await _running(h.sup, "n")
                assert files.hits == ["/missing", "/bad", "/n-1"]
                assert h.sup.errors() == []

    run(main())
    assert not (tmp_path / "plugin/n/evil").exists()


def test_no_good_url_is_abnormal_and_nothing_runs(tmp_path: Path) -> None:
    async def main() -> None:
        with files_server() as files:
            files.files["/bad"] = b"#!/bin/sh\necho ran > ran\n"
            spec = ConfigSpec(
                name="x", version="1", sha256="00" * 32, download_urls=(files.url("/bad"),)
            )
            ok = _spec(files, "ok", _exe("ok"), "1")
            async with Harness(tmp_path) as h:
                await h.sup.sync([spec, ok])
                await _running(h.sup, "ok")  # one failure does not stop the others
                errors = h.sup.errors()
                assert len(errors) == 1
                assert "plugin x" in errors[0]
                assert "sha256" in errors[0]
                assert h.sup.slot_info("x") is None
                await asyncio.sleep(0.3)
                # the next successful sync clears the abnormal state
                await h.sup.sync([ok])
                assert h.sup.errors() == []

    run(main())
    assert not (tmp_path / "plugin/x/x").exists()
    assert not (tmp_path / "plugin/x/ran").exists()
    assert not list((tmp_path / "plugin/x").glob(".download-*"))


def test_failed_upgrade_keeps_the_old_version(tmp_path: Path) -> None:
    v1 = _exe("v1")

    async def main() -> None:
        with files_server() as files:
            async with Harness(tmp_path) as h:
                await h.sup.sync([_spec(files, "k", v1, "1")])
                pid = await _running(h.sup, "k")
                bad = ConfigSpec(
                    name="k", version="2", sha256="11" * 32, download_urls=(files.url("/k-1"),)
                )
                await h.sup.sync([bad])
                assert _pid(h.sup, "k") == pid
                assert "plugin k" in h.sup.errors()[0]

    run(main())
    assert (tmp_path / "plugin/k/k").read_bytes() == v1


def test_tar_gz_install_and_signature_skip(tmp_path: Path) -> None:
    exe = _exe("tar")
    archive = tar_gz({"t": exe, "conf/settings.txt": b"x=1\n", "./README": b"hi"})

    async def main() -> None:
        with files_server() as files:
            files.files["/t.tar.gz"] = archive
            spec = ConfigSpec(
                name="t",
                type="tar.gz",
                version="1",
                sha256=sha(archive),
                signature=sha(exe),
                download_urls=(files.url("/t.tar.gz"),),
            )
            async with Harness(tmp_path) as h:
                await h.sup.sync([spec])
                await _running(h.sup, "t")
                assert (tmp_path / "plugin/t/conf/settings.txt").read_bytes() == b"x=1\n"
            # A new agent: the executable on disk hashes to `signature`, so no download.
            async with Harness(tmp_path) as h:
                await h.sup.sync([spec])
                await _running(h.sup, "t")
            assert files.hits == ["/t.tar.gz"]

    run(main())


def _hostile(kind: str) -> bytes:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(kind)
        if kind == "link":
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
        elif kind == "fifo":
            info.type = tarfile.FIFOTYPE
        else:
            info.size = 4
        tar.addfile(info, io.BytesIO(b"evil") if info.size else None)

    return tar_gz({"h": _exe("hostile")}, add)


def test_hostile_archives_are_refused(tmp_path: Path) -> None:
    names = ["../escape", "/tmp/elkeid-abs-escape", "link", "fifo", "a/../../escape2"]

    async def main() -> None:
        with files_server() as files:
            specs = []
            for i, kind in enumerate(names):
                body = _hostile(kind)
                files.files[f"/h{i}"] = body
                specs.append(
                    ConfigSpec(
                        name=f"h{i}",
                        type="tar.gz",
                        version="1",
                        sha256=sha(body),
                        download_urls=(files.url(f"/h{i}"),),
                    )
                )
            async with Harness(tmp_path) as h:
                await h.sup.sync(specs)
                errors = h.sup.errors()
                assert len(errors) == len(names), errors
                for i in range(len(names)):
                    assert h.sup.slot_info(f"h{i}") is None
                    directory = tmp_path / "plugin" / f"h{i}"
                    assert sorted(p.name for p in directory.iterdir()) == [], i

    run(main())
    assert not (tmp_path / "plugin/escape").exists()
    assert not (tmp_path / "escape2").exists()
    assert not Path("/tmp/elkeid-abs-escape").exists()


def test_bad_names_are_refused(tmp_path: Path) -> None:
    async def main() -> None:
        with files_server() as files:
            bad = _spec(files, "x", _exe("x"), "1")
            specs = [
                ConfigSpec(name=n, version="1", sha256=bad.sha256, download_urls=bad.download_urls)
                for n in ("../x", "a/b", "", ".hidden", "x y")
            ]
            async with Harness(tmp_path) as h:
                await h.sup.sync(specs)
                assert len(h.sup.errors()) == len(specs)
            assert files.hits == []

    run(main())
    assert sorted(p.name for p in (tmp_path / "plugin").iterdir()) == [".pgids"]
    assert not (tmp_path / "x").exists()


def test_down_plugin_is_abnormal(tmp_path: Path) -> None:
    async def main() -> None:
        with files_server() as files:
            async with Harness(tmp_path) as h:
                await h.sup.sync([_spec(files, "d", sh_plugin("exit 3"), "1")])
                await until(
                    lambda: (h.sup.slot_info("d") or (None,))[0] is State.BACKING_OFF,
                    what="backing off",
                )
                assert "exited with code 3" in " ".join(h.sup.errors())

    run(main())


def test_https_download_verifies_the_server(tmp_path: Path) -> None:
    certs = generate_certs(tmp_path / "pki")
    cert, key = generate_server_cert(certs, tmp_path / "srv", names=("localhost",))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    exe = _exe("tls")

    async def main() -> None:
        with files_server(server_ctx) as files:
            files.files["/p"] = exe
            url = files.url("/p", "localhost")
            spec = ConfigSpec(name="tls", version="1", sha256=sha(exe), download_urls=(url,))
            async with Harness(tmp_path) as h:
                # The host's CA store does not know this server: refused, nothing runs.
                await h.sup.sync([spec])
                assert "certificate verify failed" in h.sup.errors()[0]
                assert h.sup.slot_info("tls") is None
                # With the deployment's CA it goes through.
                h.sup.ssl_context_factory = lambda: host_ssl_context(str(certs.ca))
                await h.sup.sync([spec])
                await _running(h.sup, "tls")

    run(main())


def test_a_cancelled_sync_leaves_a_consistent_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process, "STOP_DRAIN", 0.1)
    monkeypatch.setattr(process, "STOP_GRACE", 1.0)
    stubborn = sh_plugin("trap '' TERM PIPE\nwhile :; do sleep 0.1; done")

    async def main() -> None:
        with files_server() as files:
            async with Harness(tmp_path) as h:
                spec = _spec(files, "c", stubborn, "1")
                await h.sup.sync([spec])
                pid1 = await _running(h.sup, "c")
                # A removal cancelled while the plugin is being stopped...
                removal = asyncio.create_task(h.sup.sync([]))
                await until(lambda: h.sup.slot_info("c")[0] is State.STOPPING)  # type: ignore[index]
                removal.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await removal
                # ... and the same version asked for again: it must run, not be "kept" dead.
                await h.sup.sync([spec])
                pid2 = await _running(h.sup, "c")
                assert pid2 != pid1
                assert not alive(pid1)
                assert h.sup.errors() == []

    run(main())


def test_failed_entries_cannot_bloat_the_heartbeat(tmp_path: Path) -> None:
    # Each failed entry is a line of state_detail, in every heartbeat and status.json. A
    # DownloadError quotes every URL in full (16 of up to 4 KiB each): 64 such entries made a
    # 4.4 MB heartbeat, larger than the agent's whole record lane (its other records evicted).
    refused = "http://127.0.0.1:1/"
    specs = [
        ConfigSpec(
            name=f"p{i}", version="1", sha256="ab" * 32,
            download_urls=tuple(f"{refused}{j}{'a' * 4000}" for j in range(16)),
        )
        for i in range(8)
    ]

    async def main() -> list[str]:
        async with Harness(tmp_path) as h:
            await h.sup.sync(specs)
            return h.sup.errors()

    errors = run(main())
    assert len(errors) == 8
    assert all("p" in e and "127.0.0.1:1" in e for e in errors)
    assert max(len(e) for e in errors) <= 400, max(len(e) for e in errors)


def test_a_plugin_directory_nested_deeper_than_the_recursion_limit_is_removed(
    tmp_path: Path,
) -> None:
    # shutil.rmtree raised RecursionError on it at every sync: the plugin could never be
    # removed, and its failure stood in every heartbeat.
    directory = tmp_path / "plugin" / "deep"
    directory.mkdir(parents=True)
    (directory / "deep").write_bytes(b"#!/bin/sh\n")
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(sys.getrecursionlimit() + 100):
        os.mkdir("d", dir_fd=fd)
        inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.close(fd)

    async def main() -> list[str]:
        async with Harness(tmp_path) as h:
            await h.sup.sync([])
            return h.sup.errors()

    assert run(main()) == []
    assert not directory.exists()
