"""The TLS material check names the key and the file for each kind of bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from elkeid_agent.config import TlsConfig
from elkeid_agent.transport.tls import TlsError, TlsMaterial
from elkeid_center.certs import generate_certs


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    generate_certs(directory)
    return directory


def config(pki: Path, **paths: Path) -> TlsConfig:
    return TlsConfig(
        ca=str(paths.get("ca", pki / "ca.crt")),
        cert=str(paths.get("cert", pki / "client.crt")),
        key=str(paths.get("key", pki / "client.key")),
    )


def other_key(path: Path, password: bytes | None = None) -> Path:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption()
    )
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return path


def test_good_material_loads(pki: Path) -> None:
    material = TlsMaterial.load(config(pki))
    assert material.server_name == "elkeid.com"
    assert material.ca == (pki / "ca.crt").read_bytes()


@pytest.mark.parametrize(
    ("kind", "key_name", "words"),
    [
        ("junk-ca", "tls.ca", "not a PEM certificate"),
        ("junk-cert", "tls.cert", "not a PEM certificate"),
        ("binary-ca", "tls.ca", "not a PEM certificate"),
        ("foreign-key", "tls.key", "not the unencrypted private key"),
        ("encrypted-key", "tls.key", "encrypted"),
        ("missing-key", "tls.key", "cannot read"),
    ],
)
def test_bad_material_names_key_and_file(
    pki: Path, tmp_path: Path, kind: str, key_name: str, words: str
) -> None:
    bad = tmp_path / kind
    paths = {}
    if kind == "junk-ca":
        bad.write_text("not a certificate\n")
        paths["ca"] = bad
    elif kind == "junk-cert":
        bad.write_text("-----BEGIN CERTIFICATE-----\nnope\n")
        paths["cert"] = bad
    elif kind == "binary-ca":
        bad.write_bytes(b"\xff\xfe\x00garbage")
        paths["ca"] = bad
    elif kind == "foreign-key":
        paths["key"] = other_key(bad)
    elif kind == "encrypted-key":
        paths["key"] = other_key(bad, b"secret")
    else:
        paths["key"] = bad
    with pytest.raises(TlsError) as err:
        TlsMaterial.load(config(pki, **paths))
    message = str(err.value)
    assert key_name in message
    assert words in message
    assert str(bad) in message
