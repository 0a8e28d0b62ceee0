"""Mutual-TLS material, read and checked at start (a bad file is a clear error) and again
before each connection round, so certificates renewed on disk are used at the next dial
without a restart; a renewal that does not load keeps the last good material (`reload`).

The check uses the `ssl` module the executable carries anyway (cryptography's 4 MB extension
would be in the binary for this alone): the CA must load as trust roots, the certificate must
be PEM, and the key must be the certificate's unencrypted private key.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass, field

from elkeid_agent.config import TlsConfig
from elkeid_agent.readcap import CONFIG_FILE_BYTES, read_capped
from elkeid_agent.transport.certinfo import CertError, parse_pem
from elkeid_agent.transport.grpc_env import grpc

#: A client certificate this close to its end is a warning (doctor, ctl status, heartbeat):
#: replacing certificates across a fleet takes time.
EXPIRY_WARN_DAYS = 30


class TlsError(Exception):
    pass


@dataclass(frozen=True)
class TlsMaterial:
    ca: bytes
    cert: bytes
    key: bytes
    server_name: str
    # The files too: the standard library's ssl loads a certificate chain only from files.
    cert_path: str = ""
    key_path: str = ""
    #: The client certificate's end of validity (None when its DER does not parse).
    not_after: datetime.datetime | None = field(default=None, compare=False)

    @classmethod
    def load(cls, config: TlsConfig) -> TlsMaterial:
        ca = _read(config.ca, "tls.ca")
        cert = _read(config.cert, "tls.cert")
        key = _read(config.key, "tls.key")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            context.load_verify_locations(cadata=ca.decode("ascii"))
        except (ssl.SSLError, ValueError) as exc:
            raise TlsError(f"key tls.ca: {config.ca} is not a PEM certificate ({exc})") from exc
        try:
            ssl.PEM_cert_to_DER_cert(cert.decode("ascii"))
        except ValueError as exc:
            raise TlsError(
                f"key tls.cert: {config.cert} is not a PEM certificate ({exc})"
            ) from exc
        def refuse_encrypted() -> bytes:
            # An encrypted key must fail here, not prompt on a terminal.
            raise TlsError(f"key tls.key: {config.key} is encrypted; the agent needs it plain")

        try:
            context.load_cert_chain(config.cert, config.key, password=refuse_encrypted)
        except ssl.SSLError as exc:
            raise TlsError(
                f"key tls.key: {config.key} is not the unencrypted private key of "
                f"{config.cert} ({exc.reason or exc})"
            ) from exc
        try:
            not_after: datetime.datetime | None = parse_pem(cert).not_after
        except CertError:
            not_after = None  # the handshake, not this, is the judge of the certificate
        return cls(ca, cert, key, config.server_name, config.cert, config.key, not_after)

    def expiry_warning(self, now: datetime.datetime) -> str:
        """A warning when the client certificate ends within EXPIRY_WARN_DAYS, else ""."""
        if self.not_after is None:
            return ""
        left = (self.not_after - now).total_seconds() / 86400
        end = self.not_after.strftime("%Y-%m-%d")
        if left < 0:
            return f"tls.cert {self.cert_path} expired on {end}"
        if left < EXPIRY_WARN_DAYS:
            return f"tls.cert {self.cert_path} expires on {end} ({left:.0f} days left)"
        return ""

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def _read(path: str, key: str) -> bytes:
    try:
        return read_capped(path, CONFIG_FILE_BYTES)
    except OSError as exc:
        raise TlsError(f"key {key}: cannot read {path}: {exc.strerror}") from exc
