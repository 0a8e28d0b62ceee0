"""What an X.509 certificate says, with the standard library only (for `doctor` and the probe).

The executable carries `ssl` but not `cryptography`, so the few fields an operator needs (the
subject's common name, the validity dates, the extended key usage) are read from the DER by a
minimal reader, and the chain is checked by OpenSSL itself: a TLS handshake in memory, whose
server side requires our client certificate and trusts only our CA, verifies exactly what the
AgentCenter will (chain, dates, clientAuth usage).
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass

_SEQUENCE, _SET, _OID, _OCTETS = 0x30, 0x31, 0x06, 0x04
_UTC_TIME, _GENERALIZED_TIME = 0x17, 0x18
_EXTENSIONS = 0xA3
_CN = bytes.fromhex("550403")  # 2.5.4.3
_EKU = bytes.fromhex("551d25")  # 2.5.29.37
CLIENT_AUTH = "1.3.6.1.5.5.7.3.2"
SERVER_AUTH = "1.3.6.1.5.5.7.3.1"


class CertError(ValueError):
    pass


@dataclass(frozen=True)
class CertInfo:
    subject: str  # the common name, or "" when there is none
    not_before: datetime.datetime
    not_after: datetime.datetime
    extended_usage: tuple[str, ...]  # dotted OIDs; empty = no EKU extension (any usage)

    def days_left(self, now: datetime.datetime) -> float:
        return (self.not_after - now).total_seconds() / 86400


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at `pos`."""
    if pos + 2 > len(data):
        raise CertError("truncated DER")
    tag, length = data[pos], data[pos + 1]
    start = pos + 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4 or start + count > len(data):
            raise CertError("bad DER length")
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    if start + length > len(data):
        raise CertError("truncated DER")
    return tag, start, start + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    while start < end:
        tag, cstart, cend = _tlv(data, start)
        out.append((tag, cstart, cend))
        start = cend
    return out


def _oid(raw: bytes) -> str:
    if not raw:
        raise CertError("empty OID")
    parts = [raw[0] // 40, raw[0] % 40] if raw[0] < 80 else [2, raw[0] - 80]
    value = 0
    for byte in raw[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(value)
            value = 0
    return ".".join(map(str, parts))


def _time(tag: int, raw: bytes) -> datetime.datetime:
    text = raw.decode("ascii")
    if tag == _UTC_TIME:
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != _GENERALIZED_TIME:
        raise CertError("validity is not a time")
    stamp = datetime.datetime.strptime(text.rstrip("Z"), "%Y%m%d%H%M%S")
    return stamp.replace(tzinfo=datetime.UTC)


def _common_name(data: bytes, start: int, end: int) -> str:
    for tag, rstart, rend in _children(data, start, end):
        if tag != _SET:
            continue
        for _, astart, aend in _children(data, rstart, rend):
            attr = _children(data, astart, aend)
            if len(attr) == 2 and data[attr[0][1] : attr[0][2]] == _CN:
                return data[attr[1][1] : attr[1][2]].decode("utf-8", "replace")
    return ""


def parse_der(der: bytes) -> CertInfo:
    """The subject CN, validity and extended key usage of one DER certificate."""
    try:
        _, cstart, cend = _tlv(der, 0)
        _, tstart, tend = _children(der, cstart, cend)[0]
        fields = _children(der, tstart, tend)
        if fields and fields[0][0] == 0xA0:  # explicit version
            fields = fields[1:]
        # serial, signature algorithm, issuer, validity, subject, key, then optional parts
        validity = _children(der, fields[3][1], fields[3][2])
        not_before = _time(validity[0][0], der[validity[0][1] : validity[0][2]])
        not_after = _time(validity[1][0], der[validity[1][1] : validity[1][2]])
        subject = _common_name(der, fields[4][1], fields[4][2])
        usage: tuple[str, ...] = ()
        for tag, estart, _ in fields[6:]:
            if tag != _EXTENSIONS:
                continue
            _, sstart, send = _tlv(der, estart)
            for _, xstart, xend in _children(der, sstart, send):
                ext = _children(der, xstart, xend)
                if der[ext[0][1] : ext[0][2]] != _EKU:
                    continue
                _, vstart, _ = ext[-1]
                _, qstart, qend = _tlv(der, vstart)
                usage = tuple(_oid(der[s:e]) for _, s, e in _children(der, qstart, qend))
    except (IndexError, ValueError, UnicodeDecodeError) as exc:
        raise CertError(f"not an X.509 certificate: {exc}") from exc
    return CertInfo(subject, not_before, not_after, usage)


def parse_pem(pem: bytes) -> CertInfo:
    """The first certificate of a PEM file."""
    try:
        der = ssl.PEM_cert_to_DER_cert(pem.decode("ascii"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CertError(f"not a PEM certificate: {exc}") from exc
    return parse_der(der)


def verify_client_cert(ca_pem: bytes, cert_path: str, key_path: str) -> str | None:
    """Why a server that trusts only `ca_pem` would refuse this client certificate, or None.

    OpenSSL checks it as a TLS server checks a client: chain to the CA, validity dates, usage.
    """
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(cadata=ca_pem.decode("ascii"))
    # The server side needs some certificate of its own; ours will do, nobody checks it.
    server.load_cert_chain(cert_path, key_path)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.load_cert_chain(cert_path, key_path)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c_side = client.wrap_bio(c_in, c_out, server_side=False)
    s_side = server.wrap_bio(s_in, s_out, server_side=True)
    done = {False: False, True: False}
    for _ in range(8):
        for is_server, side, out, peer_in in (
            (False, c_side, c_out, s_in),
            (True, s_side, s_out, c_in),
        ):
            if not done[is_server]:
                try:
                    side.do_handshake()
                    done[is_server] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLCertVerificationError as exc:
                    if is_server:
                        return str(exc.verify_message)
                    raise
            peer_in.write(out.read())
        if done[True]:
            return None
    return "the handshake did not complete"
