"""Test PKI for the local center: a private CA, the `elkeid.com` server cert, a client cert.

The real deployment gives every agent `ca.crt`, `client.crt` and `client.key`, and the
AgentCenter presents a certificate for the fixed name `elkeid.com` (PROTOCOL.md section 1).
This module reproduces that layout so the agent can be run against the local center
unchanged, plus two deliberately wrong variants (an unrelated CA, a wrong server name)
for tests that check the agent refuses them.

EC P-256 keys: generation takes milliseconds, which matters in per-test fixtures.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAME = "elkeid.com"
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
CLIENT_CERT = "client.crt"
CLIENT_KEY = "client.key"
CLIENT_NAME = "elkeid-agent"
# Long enough to never expire during a demo, short enough to stay a valid X.509 date.
VALIDITY = datetime.timedelta(days=3650)
# Clock skew between the machine that made the certs and one that checks them.
BACKDATE = datetime.timedelta(days=1)


@dataclass(frozen=True)
class CertFiles:
    """Paths of one PKI directory (the file names are fixed, as on an agent host)."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.directory / CA_KEY

    @property
    def server_cert(self) -> Path:
        return self.directory / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.directory / SERVER_KEY

    @property
    def client_cert(self) -> Path:
        return self.directory / CLIENT_CERT

    @property
    def client_key(self) -> Path:
        return self.directory / CLIENT_KEY

    def complete(self) -> bool:
        """True when every file exists (so `ensure_certs` can leave them alone)."""
        return all(
            p.is_file()
            for p in (
                self.ca,
                self.ca_key,
                self.server_cert,
                self.server_key,
                self.client_cert,
                self.client_key,
            )
        )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "elkeid-center test PKI"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    valid: tuple[datetime.datetime, datetime.datetime] | None = None,
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = valid or (now - BACKDATE, now + VALIDITY)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _make_ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    name = _name(common_name)
    cert = (
        _builder(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    server: bool,
    dns_names: tuple[str, ...] = (),
    valid: tuple[datetime.datetime, datetime.datetime] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(_name(common_name), ca_cert.subject, key.public_key(), valid)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(_ec_public(ca_cert)),
            critical=False,
        )
    )
    if dns_names:
        sans: list[x509.GeneralName] = []
        for n in dns_names:
            # An IP literal only matches as an iPAddress SAN, never as a dNSName.
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _ec_public(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise TypeError(f"expected an EC CA key, got {type(key).__name__}")
    return key


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Create with 0600 from the start: a chmod after writing leaves a readable window.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(pem)


def generate_certs(
    directory: str | os.PathLike[str],
    *,
    server_name: str = SERVER_NAME,
    ca_name: str = "elkeid-center test CA",
) -> CertFiles:
    """Write a fresh CA with a server cert for `server_name` and a client cert, all new.

    Files: ca.crt, ca.key, server.crt, server.key, client.crt, client.key (keys 0600).
    Every call makes a new CA, so two calls give two unrelated PKIs.
    """
    files = CertFiles(Path(directory))
    files.directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _make_ca(ca_name)
    server_cert, server_key = _make_leaf(
        ca_cert, ca_key, server_name, server=True, dns_names=(server_name,)
    )
    client_cert, client_key = _make_leaf(ca_cert, ca_key, CLIENT_NAME, server=False)
    _write_key(files.ca_key, ca_key)
    _write_cert(files.ca, ca_cert)
    _write_key(files.server_key, server_key)
    _write_cert(files.server_cert, server_cert)
    _write_key(files.client_key, client_key)
    _write_cert(files.client_cert, client_cert)
    return files


def ensure_certs(directory: str | os.PathLike[str]) -> CertFiles:
    """Reuse the PKI in `directory` if complete, else generate one (the CLI's behaviour)."""
    files = CertFiles(Path(directory))
    if files.complete():
        return files
    return generate_certs(directory)


def generate_unrelated_certs(directory: str | os.PathLike[str]) -> CertFiles:
    """A second PKI that shares nothing with any other: its server cert still says
    `elkeid.com`, so an agent that refuses it does so because of the chain alone."""
    return generate_certs(directory, ca_name="elkeid-center UNRELATED CA")


def generate_server_cert(
    ca: CertFiles,
    directory: str | os.PathLike[str],
    *,
    names: tuple[str, ...] = ("wrong.example.com",),
    stem: str = "server",
) -> tuple[Path, Path]:
    """Sign a server cert for `names` (DNS names or IP literals) with the CA of `ca`.

    Returns (cert path, key path) written into `directory` as `<stem>.crt` /
    `<stem>.key`. With the default name it serves tests that check the agent verifies
    the name and not only the chain; `https_context` uses it for the file server.
    """
    ca_cert, ca_key = _load_ca(ca)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cert, key = _make_leaf(ca_cert, ca_key, names[0], server=True, dns_names=names)
    cert_path, key_path = out / f"{stem}.crt", out / f"{stem}.key"
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


def generate_client_cert(
    ca: CertFiles,
    directory: str | os.PathLike[str],
    *,
    expired: bool = False,
    stem: str = "client",
    days_left: float | None = None,
) -> tuple[Path, Path]:
    """Sign another client cert with the CA of `ca` (`expired`: it ended yesterday;
    `days_left`: it ends that many days from now).

    Returns (cert path, key path) written into `directory` as `<stem>.crt` / `<stem>.key`.
    """
    ca_cert, ca_key = _load_ca(ca)
    now = datetime.datetime.now(datetime.UTC)
    valid = (now - 2 * VALIDITY, now - BACKDATE) if expired else None
    if days_left is not None:
        valid = (now - BACKDATE, now + datetime.timedelta(days=days_left))
    cert, key = _make_leaf(ca_cert, ca_key, CLIENT_NAME, server=False, valid=valid)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / f"{stem}.crt", out / f"{stem}.key"
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


def _load_ca(ca: CertFiles) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert = x509.load_pem_x509_certificate(ca.ca.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.ca_key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{ca.ca_key}: expected an EC key")
    return ca_cert, ca_key


def https_context(ca: CertFiles, host: str) -> ssl.SSLContext:
    """A TLS server context for HTTP on `host` (an IP or a name) with a cert from the CA
    of `ca`, so a client trusting only `ca.crt` can verify downloads over HTTPS."""
    cert, key = generate_server_cert(ca, ca.directory, names=(host, "localhost"), stem="https")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx
