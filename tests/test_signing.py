"""The appended signature block (elkeid_agent/signing): format, keys, policy, the pinned
keys' config layers, and the signing tool."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from signtools import TestKey, tamper

from elkeid_agent.config import ConfigError, load_config
from elkeid_agent.signing.check import Verifier, read_block, strip, verifier_from
from elkeid_agent.signing.format import (
    MAGIC,
    SIGNATURE_BYTES,
    TRAILER_BYTES,
    BadBlock,
    parse_tail,
)
from elkeid_agent.signing.keys import Policy, is_downgrade

REPO = Path(__file__).resolve().parent.parent
CONTENT = b"#!/bin/sh\necho hello\n" * 50


def _file(tmp_path: Path, data: bytes, name: str = "artifact") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _check(path: Path, key: TestKey, policy: Policy = Policy.ENFORCE, name: str = "p",
           version: str = "1", running: str | None = None) -> str | None:
    return Verifier(policy, [key.pinned]).check(path, name, version, running).problem


def test_a_signed_artifact_verifies_and_strips_to_its_content(tmp_path: Path) -> None:
    key = TestKey()
    path = _file(tmp_path, key.sign(CONTENT, "p", "1"))
    verdict = Verifier(Policy.ENFORCE, [key.pinned]).check(path, "p", "1")
    assert (verdict.problem, verdict.refuse) == (None, False)
    assert verdict.block is not None
    assert verdict.block.metadata.key_id == key.pinned.key_id
    strip(path, verdict)
    assert path.read_bytes() == CONTENT


def test_problems(tmp_path: Path) -> None:
    key = TestKey()
    cases = [
        (key.sign(CONTENT, "p", "1")[:-1] + b"!", "unsigned"),  # the magic broken
        (tamper(key.sign(CONTENT, "p", "1")), "changed after signing"),
        (key.sign(CONTENT, "q", "1"), "signed for 'q' '1', not 'p' '1'"),
        (key.sign(CONTENT, "p", "2"), "signed for 'p' '2', not 'p' '1'"),
        (TestKey().sign(CONTENT, "p", "1"), "unknown key"),
    ]
    for data, expected in cases:
        assert expected in str(_check(_file(tmp_path, data), key)), expected


def test_a_bad_signature_over_good_metadata(tmp_path: Path) -> None:
    key = TestKey()
    signed = bytearray(key.sign(CONTENT, "p", "1"))
    signed[len(signed) - TRAILER_BYTES - SIGNATURE_BYTES] ^= 0x01  # the signature's first byte
    assert _check(_file(tmp_path, bytes(signed)), key) == f"bad signature (key {key.pinned.key_id})"


def test_unsigned_and_expired_keys(tmp_path: Path) -> None:
    key = TestKey()
    assert _check(_file(tmp_path, CONTENT), key) == "unsigned"
    old = TestKey(not_after=datetime.now(UTC) - timedelta(days=1))
    found = _check(_file(tmp_path, old.sign(CONTENT, "p", "1")), old)
    assert found is not None
    assert "expired" in found


def test_policies(tmp_path: Path) -> None:
    key = TestKey()
    path = _file(tmp_path, tamper(key.sign(CONTENT, "p", "1")))
    enforce = Verifier(Policy.ENFORCE, [key.pinned]).check(path, "p", "1")
    warn = Verifier(Policy.WARN, [key.pinned]).check(path, "p", "1")
    off = Verifier(Policy.OFF, [key.pinned]).check(path, "p", "1")
    assert enforce.refuse
    assert enforce.problem
    assert not warn.refuse
    assert warn.problem
    assert not off.refuse
    assert off.problem is None
    assert off.block is not None  # still cut off before use, whatever the policy


def test_downgrades_need_the_signed_permission(tmp_path: Path) -> None:
    key = TestKey()
    down = _file(tmp_path, key.sign(CONTENT, "elkeid-agent", "1.9.0.9"))
    assert "downgrade from 1.9.0.10 to 1.9.0.9" in str(
        _check(down, key, name="elkeid-agent", version="1.9.0.9", running="1.9.0.10"))
    allowed = _file(tmp_path, key.sign(CONTENT, "elkeid-agent", "1.9.0.9", allow_downgrade=True))
    assert _check(allowed, key, name="elkeid-agent", version="1.9.0.9", running="1.9.0.10") is None
    up = _file(tmp_path, key.sign(CONTENT, "elkeid-agent", "1.9.0.11"))
    assert _check(up, key, name="elkeid-agent", version="1.9.0.11", running="1.9.0.10") is None
    assert is_downgrade("1.9.0.9", "1.9.0.10")
    assert not is_downgrade("1.10.0.0", "1.9.9.9")


@pytest.mark.parametrize("trailer", [
    b"\x00\x00\x00\x10\x00\x00\x00\x20" + MAGIC,  # a signature of 32 bytes
    b"\x00\x01\x00\x00\x00\x00\x00\x40" + MAGIC,  # metadata of 64 KiB
    b"\x00\x00\x00\x10\x00\x00\x00\x40" + MAGIC,  # longer than the file
])
def test_malformed_blocks_are_refused_with_a_reason(trailer: bytes) -> None:
    with pytest.raises(BadBlock):
        parse_tail(trailer, len(trailer))


def test_a_block_lying_about_the_content_size(tmp_path: Path) -> None:
    key = TestKey()
    path = _file(tmp_path, b"x" + key.sign(CONTENT, "p", "1"))
    with pytest.raises(BadBlock, match="content"):
        read_block(path)
    assert "malformed signature block" in str(_check(path, key))


def test_an_elf_executable_runs_with_its_block(tmp_path: Path) -> None:
    key = TestKey()
    exe = _file(tmp_path, key.sign(Path("/bin/true").read_bytes(), "true", "1"), "true")
    exe.chmod(0o755)
    assert subprocess.run([str(exe)], check=False).returncode == 0


# -- config ------------------------------------------------------------------------------------


def _config(tmp_path: Path, product: str, host: str) -> Path:
    tls = tmp_path / "tls"
    tls.write_text("x")
    (tmp_path / "product.toml").write_text(product)
    path = tmp_path / "agent.toml"
    path.write_text(f'[tls]\nca = "{tls}"\ncert = "{tls}"\nkey = "{tls}"\n{host}')
    return path


def _keys(*keys: tuple[TestKey, str]) -> str:
    return "".join(f'[[signing.keys]]\npublic_key = "{k.b64}"\n{extra}\n' for k, extra in keys)


def test_policy_defaults_to_enforce_only_with_a_built_in_key(tmp_path: Path) -> None:
    built, hosts = TestKey(), TestKey()
    product = tmp_path / "product.toml"
    config = load_config(_config(tmp_path, _keys((built, "")), _keys((hosts, ""))), {}, product)
    verifier = verifier_from(config.signing)
    assert verifier.policy is Policy.ENFORCE
    assert [k.public_key for k in verifier.keys] == [built.public, hosts.public]
    # Keys from the host's file alone: the package stays a drop-in, policy off unless set.
    config = load_config(_config(tmp_path, "", _keys((hosts, ""))), {}, product)
    assert verifier_from(config.signing).policy is Policy.OFF
    config = load_config(_config(tmp_path, _keys((built, "")), '[signing]\npolicy = "warn"\n'),
                         {}, product)
    assert verifier_from(config.signing).policy is Policy.WARN


def test_key_config_errors_name_the_key(tmp_path: Path) -> None:
    product = tmp_path / "product.toml"
    with pytest.raises(ConfigError, match=r"key signing\.keys\[0\]: .*not 32"):
        load_config(_config(tmp_path, "", '[[signing.keys]]\npublic_key = "AAAA"\n'), {}, product)
    key = TestKey()
    with pytest.raises(ConfigError, match="time zone"):
        load_config(_config(tmp_path, "", _keys((key, "not_after = 2027-01-01T00:00:00"))),
                    {}, product)
    config = load_config(_config(tmp_path, "", _keys((key, "not_after = 2027-01-01T00:00:00Z"))),
                         {}, product)
    assert config.signing.keys[0].not_after == datetime(2027, 1, 1, tzinfo=UTC)
    with pytest.raises(ConfigError, match=r"signing\.policy"):
        load_config(_config(tmp_path, "", '[signing]\npolicy = "maybe"\n'), {}, product)
    assert msgspec.structs.asdict(load_config(_config(tmp_path, "", ""), {}, product).signing) == {
        "policy": None, "keys": []}


# -- the signing tool --------------------------------------------------------------------------


def test_the_signing_tool_keygen_sign_verify(tmp_path: Path) -> None:
    tool = [sys.executable, str(REPO / "tools" / "sign.py")]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*tool, *args], capture_output=True, text=True, timeout=60,
                              check=False)

    gen = run("keygen", str(tmp_path / "release"))
    assert gen.returncode == 0, gen.stderr
    assert "[[signing.keys]]" in gen.stdout
    assert (tmp_path / "release.key").stat().st_mode & 0o777 == 0o600
    artifact = _file(tmp_path, CONTENT)
    assert run("sign", "--key", str(tmp_path / "release.key"), "--name", "p", "--version", "1",
               str(artifact)).returncode == 0
    pub = str(tmp_path / "release.pub")

    def verify(version: str) -> subprocess.CompletedProcess[str]:
        return run("verify", "--pub", pub, "--name", "p", "--version", version, str(artifact))

    assert verify("1").returncode == 0
    wrong = verify("2")
    assert wrong.returncode == 1
    assert "signed for 'p' '1'" in wrong.stderr
    # Signing again replaces the block: one block, the content unchanged.
    assert run("sign", "--key", str(tmp_path / "release.key"), "--name", "p", "--version", "2",
               str(artifact)).returncode == 0
    assert verify("2").returncode == 0
    assert run("strip", str(artifact)).returncode == 0
    assert artifact.read_bytes() == CONTENT
    assert "no block" in run("strip", str(artifact)).stdout


def test_a_key_id_that_is_not_hex_is_malformed(tmp_path: Path) -> None:
    """Whoever serves the file writes an unknown key's id, which the refusal quotes into the
    log and state_detail: a newline there would forge log lines."""
    import hashlib

    from elkeid_agent.signing.format import Metadata, encode_block, encode_metadata

    forged = "0123456789abcdef\n2026-12-07 00:00:00 INFO plugin p 1 started"
    meta = encode_metadata(Metadata(key_id=forged, name="p", version="1", size=len(CONTENT),
                                    sha256=hashlib.sha256(CONTENT).hexdigest()))
    path = _file(tmp_path, CONTENT + encode_block(meta, b"\x00" * SIGNATURE_BYTES))
    with pytest.raises(BadBlock, match="key_id"):
        read_block(path)
    assert "\n" not in str(_check(path, TestKey()))
