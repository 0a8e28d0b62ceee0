"""Mutual-TLS material, read and checked once at start so a bad file is a clear error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from elkeid_agent.config import TlsConfig
from elkeid_agent.transport.grpc_env import grpc


class TlsError(Exception):
    pass


@dataclass(frozen=True)
class TlsMaterial:
    ca: bytes
    cert: bytes
    key: bytes
    server_name: str

    @classmethod
    def load(cls, config: TlsConfig) -> TlsMaterial:
        ca = _read(config.ca, "tls.ca")
        cert = _read(config.cert, "tls.cert")
        key = _read(config.key, "tls.key")
        for data, name, path in ((ca, "tls.ca", config.ca), (cert, "tls.cert", config.cert)):
            try:
                x509.load_pem_x509_certificates(data)
            except ValueError as exc:
                raise TlsError(f"key {name}: {path} is not a PEM certificate ({exc})") from exc
        try:
            load_pem_private_key(key, password=None)
        except (ValueError, TypeError) as exc:
            raise TlsError(
                f"key tls.key: {config.key} is not an unencrypted PEM private key ({exc})"
            ) from exc
        return cls(ca, cert, key, config.server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def _read(path: str, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"key {key}: cannot read {path}: {exc.strerror}") from exc
