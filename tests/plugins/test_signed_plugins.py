"""Acceptance (issue 21): plugins checked against pinned publisher keys, with real
downloads from a real HTTP server and real plugin processes. The server's sha256 always
matches what it serves: only the signature tells a tampered plugin from a good one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from plugtools import Files, Harness, files_server, run, sh_plugin, sha, tar_gz, until
from signtools import TestKey, tamper

from elkeid_agent.commands import ConfigSpec
from elkeid_agent.signing.check import Verifier
from elkeid_agent.signing.keys import Policy

# `tamper` changes byte 20: in the comment, so a tampered plugin still runs (warn, off).
PLUGIN = sh_plugin("# a comment to change\necho ran >> ran\nexec cat <&3 >/dev/null")


def _spec(files: Files, name: str, body: bytes, version: str = "1",
          kind: str = "") -> ConfigSpec:
    files.files[f"/{name}-{version}"] = body
    return ConfigSpec(name=name, version=version, sha256=sha(body), type=kind,
                      download_urls=(files.url(f"/{name}-{version}"),))


Outcome = tuple[dict[str, bool], list[str], dict[str, int]]


def _sync(work: Path, verifier: Verifier, specs: list[tuple[str, bytes, str, str]]) -> Outcome:
    """Sync (name, body, version, type) entries; which plugins ran, the sync's errors and the
    signature counters."""

    async def main() -> Outcome:
        with files_server() as files:
            async with Harness(work) as h:
                h.sup.verifier = verifier
                await h.sup.sync([_spec(files, *s) for s in specs])
                ran = {s[0]: work / "plugin" / s[0] / "ran" for s in specs}
                started = [n for n in ran if h.sup.slot_info(n) is not None]
                await until(lambda: all(ran[n].exists() for n in started), what="plugins ran")
                errors = h.sup.errors()
                counters = {k: v for k, v in h.sup.health.counters.items() if "signature" in k}
        return {n: p.exists() for n, p in ran.items()}, errors, counters

    return run(main())


def test_tampered_plugin_refused_in_enforce_logged_in_warn_run_in_off(tmp_path: Path) -> None:
    key = TestKey()
    tampered = tamper(key.sign(PLUGIN, "p", "1"))
    ran, errors, counters = _sync(tmp_path / "enforce", Verifier(Policy.ENFORCE, [key.pinned]),
                                  [("p", tampered, "1", "")])
    assert ran == {"p": False}
    assert any("(changed after signing); refused" in e for e in errors)
    assert counters == {"signature_refused": 1}
    assert not (tmp_path / "enforce" / "plugin" / "p" / "p").exists()  # nothing in place

    ran, errors, counters = _sync(tmp_path / "warn", Verifier(Policy.WARN, [key.pinned]),
                                  [("p", tampered, "1", "")])
    assert ran == {"p": True}
    assert errors == []
    assert counters == {"signature_warnings": 1}

    ran, errors, counters = _sync(tmp_path / "off", Verifier(Policy.OFF, [key.pinned]),
                                  [("p", tampered, "1", "")])
    assert (ran, errors, counters) == ({"p": True}, [], {})


def test_signed_plugins_run_and_replays_under_another_name_or_version_do_not(
        tmp_path: Path) -> None:
    key = TestKey()
    signed = key.sign(PLUGIN, "good", "1")
    archive = key.sign(tar_gz({"packed": PLUGIN}), "packed", "2")
    ran, errors, counters = _sync(tmp_path, Verifier(Policy.ENFORCE, [key.pinned]), [
        ("good", signed, "1", ""),
        ("other", signed, "1", ""),  # the same bytes under another plugin's name
        ("later", key.sign(PLUGIN, "later", "1"), "2", ""),  # signed for version 1
        ("packed", archive, "2", "tar.gz"),  # a signed tar.gz: cut, then unpacked
    ])
    assert ran == {"good": True, "other": False, "later": False, "packed": True}
    assert any("plugin other: signature: signed for 'good' '1', not 'other' '1'" in e
               for e in errors)
    assert any("signed for 'later' '1', not 'later' '2'" in e for e in errors)
    assert counters == {"signature_refused": 2}
    # The bare plugin keeps its block (its sha256 is the server's), and runs with it.
    assert (tmp_path / "plugin" / "good" / "good").read_bytes() == signed


def test_a_rotated_key_runs_an_expired_key_is_refused(tmp_path: Path) -> None:
    retiring = TestKey(not_after=datetime.now(UTC) + timedelta(days=30))
    rotated = TestKey()
    expired = TestKey(not_after=datetime.now(UTC) - timedelta(seconds=1))
    verifier = Verifier(Policy.ENFORCE, [retiring.pinned, rotated.pinned, expired.pinned])
    ran, errors, _ = _sync(tmp_path, verifier, [
        ("old", retiring.sign(PLUGIN, "old", "1"), "1", ""),
        ("new", rotated.sign(PLUGIN, "new", "1"), "1", ""),
        ("stale", expired.sign(PLUGIN, "stale", "1"), "1", ""),
        ("stranger", TestKey().sign(PLUGIN, "stranger", "1"), "1", ""),
        ("bare", PLUGIN, "1", ""),
    ])
    assert ran == {"old": True, "new": True, "stale": False, "stranger": False, "bare": False}
    assert any(f"signed with key {expired.pinned.key_id}, expired" in e for e in errors)
    assert any("plugin stranger: signature: signed with unknown key" in e for e in errors)
    assert any("plugin bare: signature: unsigned; refused" in e for e in errors)


def test_bytes_in_place_asked_for_as_another_version_are_checked_again(tmp_path: Path) -> None:
    key = TestKey()
    signed = key.sign(PLUGIN, "p", "1")
    ran, errors, _ = _sync(tmp_path, Verifier(Policy.ENFORCE, [key.pinned]),
                           [("p", signed, "1", "")])
    assert (ran, errors) == ({"p": True}, [])
    (tmp_path / "plugin" / "p" / "ran").unlink()
    # The server now calls the same bytes version 2: nothing is downloaded, and the block in
    # place says version 1.
    ran, errors, counters = _sync(tmp_path, Verifier(Policy.ENFORCE, [key.pinned]),
                                  [("p", signed, "2", "")])
    assert ran == {"p": False}
    assert any("signed for 'p' '1', not 'p' '2'" in e for e in errors)
    assert counters == {"signature_refused": 1}


def _sync_specs(work: Path, verifier: Verifier, files: Files,
                specs: list[ConfigSpec]) -> tuple[dict[str, bool], list[str]]:
    """Sync prepared specs; which plugins ran (wrote `ran`) and the sync's errors."""

    async def main() -> tuple[dict[str, bool], list[str]]:
        async with Harness(work) as h:
            h.sup.verifier = verifier
            await h.sup.sync(specs)
            ran = {s.name: work / "plugin" / s.name / "ran" for s in specs}
            started = [n for n in ran if h.sup.slot_info(n) is not None]
            await until(lambda: all(ran[n].exists() for n in started), what="plugins ran")
            errors = h.sup.errors()
        return {n: p.exists() for n, p in ran.items()}, errors

    return run(main())


def test_files_in_place_of_a_tar_gz_run_in_enforce_only_if_verified_when_unpacked(
        tmp_path: Path) -> None:
    """An unpacked archive's executable carries no block: in `enforce` it runs from disk only
    when this agent verified the archive it came from. Else (a bare plugin installed unsigned
    under `warn`, now asked for as a tar.gz naming its hash; files the Go agent unpacked) the
    archive is fetched and checked again."""
    key = TestKey()
    with files_server() as files:
        # Installed unsigned under warn.
        ran, _ = _sync_specs(tmp_path, Verifier(Policy.WARN, [key.pinned]), files,
                             [_spec(files, "p", PLUGIN)])
        assert ran == {"p": True}
        (tmp_path / "plugin" / "p" / "ran").unlink()
        # Enforce: the server calls the bytes in place a tar.gz's executable (signature),
        # and serves an unsigned archive.
        files.files["/p.tar.gz"] = unsigned = tar_gz({"p": PLUGIN})
        flipped = ConfigSpec(name="p", version="1", type="tar.gz", sha256=sha(unsigned),
                             signature=sha(PLUGIN), download_urls=(files.url("/p.tar.gz"),))
        ran, errors = _sync_specs(tmp_path, Verifier(Policy.ENFORCE, [key.pinned]), files,
                                  [flipped])
        assert ran == {"p": False}
        assert any("plugin p: signature: unsigned; refused" in e for e in errors)

        # A signed archive, verified when unpacked: its files run from disk at the next sync,
        # not downloaded again.
        files.files["/q.tar.gz"] = archive = key.sign(tar_gz({"q": PLUGIN}), "q", "1")
        spec = ConfigSpec(name="q", version="1", type="tar.gz", sha256=sha(archive),
                          signature=sha(PLUGIN), download_urls=(files.url("/q.tar.gz"),))
        enforce = Verifier(Policy.ENFORCE, [key.pinned])
        assert _sync_specs(tmp_path / "q", enforce, files, [spec]) == ({"q": True}, [])
        (tmp_path / "q" / "plugin" / "q" / "ran").unlink()
        files.hits.clear()
        assert _sync_specs(tmp_path / "q", enforce, files, [spec]) == ({"q": True}, [])
        assert files.hits == []
        # The same files asked for as another version are fetched (and refused: signed as 1).
        files.hits.clear()
        later = ConfigSpec(name="q", version="2", type="tar.gz", sha256=sha(archive),
                           signature=sha(PLUGIN), download_urls=(files.url("/q.tar.gz"),))
        ran, errors = _sync_specs(tmp_path / "q", enforce, files, [later])
        assert files.hits == ["/q.tar.gz"]
        assert any("signed for 'q' '1', not 'q' '2'" in e for e in errors)


def test_an_archive_cannot_bring_its_own_record_of_verification(tmp_path: Path) -> None:
    key = TestKey()
    with files_server() as files:
        forged = (b'{"name":"p","version":"1","key_id":"' + key.pinned.key_id.encode()
                  + b'","executable_sha256":"' + sha(PLUGIN).encode() + b'"}')
        files.files["/p.tar.gz"] = unsigned = tar_gz({"p": PLUGIN, ".signature.json": forged})
        spec = ConfigSpec(name="p", version="1", type="tar.gz", sha256=sha(unsigned),
                          signature=sha(PLUGIN), download_urls=(files.url("/p.tar.gz"),))
        assert _sync_specs(tmp_path, Verifier(Policy.WARN, [key.pinned]), files,
                           [spec])[0] == {"p": True}
        assert not (tmp_path / "plugin" / "p" / ".signature.json").exists()
        (tmp_path / "plugin" / "p" / "ran").unlink()
        ran, errors = _sync_specs(tmp_path, Verifier(Policy.ENFORCE, [key.pinned]), files,
                                  [spec])
        assert ran == {"p": False}
        assert any("plugin p: signature: unsigned; refused" in e for e in errors)
