"""certinfo reads DER by hand: whatever bytes a certificate file holds, it raises CertError only."""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elkeid_agent.transport.certinfo import CertError, parse_der, parse_pem
from elkeid_center.certs import ensure_certs

FUZZ = settings(max_examples=600, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def ders(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    certs = ensure_certs(tmp_path_factory.mktemp("certs"))
    return [
        ssl.PEM_cert_to_DER_cert(Path(p).read_text())
        for p in (certs.ca, certs.server_cert, certs.client_cert)
    ]


def _parse_or_cert_error(der: bytes) -> None:
    with contextlib.suppress(CertError):
        parse_der(der)


def test_every_truncation_raises_cert_error_only(ders: list[bytes]) -> None:
    for der in ders:
        parse_der(der)  # the whole certificate parses
        for end in range(len(der)):
            _parse_or_cert_error(der[:end])


@FUZZ
@given(data=st.data())
def test_mutated_certificates_raise_cert_error_only(ders: list[bytes], data: st.DataObject) -> None:
    der = bytearray(data.draw(st.sampled_from(ders)))
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(der) - 1))
        der[at] = data.draw(st.integers(0, 255))
    _parse_or_cert_error(bytes(der))


@FUZZ
@given(st.binary(max_size=600))
def test_garbage_raises_cert_error_only(raw: bytes) -> None:
    _parse_or_cert_error(raw)
    _parse_or_cert_error(b"\x30\x82" + raw)


@FUZZ
@given(st.binary(max_size=300))
def test_garbage_pem_raises_cert_error_only(raw: bytes) -> None:
    with contextlib.suppress(CertError):
        parse_pem(b"-----BEGIN CERTIFICATE-----\n" + raw + b"\n-----END CERTIFICATE-----\n")
