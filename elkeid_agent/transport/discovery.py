"""Finding the AgentCenter (PROTOCOL.md section 4) and pacing reconnects.

The ladder is service discovery first (each answered node in turn), then the private address,
then the public one; the net mode of the address that answered goes into the heartbeat.
`Backoff` follows gRPC's connection-backoff document: 1 s growing 1.6x to 120 s, with jitter,
and the agent never exits for lack of a server.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from enum import StrEnum

import msgspec

from elkeid_agent import http
from elkeid_agent.config import RegionConfig

log = logging.getLogger(__name__)

#: Nodes asked of the registry; an answer with more is cut here (each one is a dial of up to
#: dial_timeout plus its diagnosis, and a line of state_detail when it fails).
SD_COUNT = 10
SD_PATH = f"/registry/detail?name=hids_svr_grpc&count={SD_COUNT}"
SD_MAX_ANSWER = 256 * 1024
#: The longest a discovery request may take, connect to last byte.
SD_TIMEOUT = 15.0


class NetMode(StrEnum):
    UNKNOWN = "unknown"
    SD = "sd"
    PRIVATE = "private"
    PUBLIC = "public"


@dataclass(frozen=True)
class Candidate:
    address: str
    net_mode: NetMode


class SdNode(msgspec.Struct):
    ip: str
    port: int
    weight: int = 0


class SdAnswer(msgspec.Struct):
    msg: str
    data: list[SdNode] = []


class DiscoveryError(Exception):
    pass


def parse_sd_answer(body: bytes) -> list[str]:
    """`ip:port` of every node the registry returned, in its order; errors name the field."""
    try:
        answer = msgspec.json.decode(body, type=SdAnswer)
    except msgspec.ValidationError as exc:
        raise DiscoveryError(f"service discovery answer: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise DiscoveryError(f"service discovery answer is not JSON: {exc}") from exc
    if answer.msg != "ok":
        raise DiscoveryError(f"service discovery says {answer.msg!r}")
    if len(answer.data) > SD_COUNT:
        log.warning("service discovery answered %d nodes; the first %d are used",
                    len(answer.data), SD_COUNT)
    out = []
    for node in answer.data[:SD_COUNT]:
        if not 0 < node.port < 65536 or not node.ip:
            raise DiscoveryError(f"service discovery node {node.ip!r}:{node.port} is invalid")
        host = f"[{node.ip}]" if ":" in node.ip else node.ip
        out.append(f"{host}:{node.port}")
    return out


def candidates(region: RegionConfig, sd_nodes: list[str]) -> list[Candidate]:
    """The addresses to dial, in PROTOCOL order."""
    out = [Candidate(a, NetMode.SD) for a in sd_nodes]
    if region.private:
        out.append(Candidate(region.private, NetMode.PRIVATE))
    if region.public:
        out.append(Candidate(region.public, NetMode.PUBLIC))
    return out


@dataclass
class Backoff:
    initial: float = 1.0
    multiplier: float = 1.6
    maximum: float = 120.0
    jitter: float = 0.2
    rng: random.Random = field(default_factory=random.Random)
    _current: float = 0.0

    def next(self) -> float:
        """The delay before the next attempt."""
        grown = min(self._current * self.multiplier, self.maximum)
        self._current = grown if self._current else self.initial
        return self._current * (1 + self.rng.uniform(-self.jitter, self.jitter))

    def reset(self) -> None:
        self._current = 0.0


async def fetch_sd_nodes(host: str, *, timeout: float = SD_TIMEOUT) -> list[str]:  # noqa: ASYNC109
    """Ask a ServiceDiscovery host (`ip:port`) for the AgentCenter nodes.

    Any failure, from the network to a malformed answer, is a DiscoveryError with a readable
    reason; the caller may bound the whole call with a shorter timeout of its own.
    """
    try:
        body = await http.fetch(f"http://{host}{SD_PATH}", timeout=timeout,
                                max_bytes=SD_MAX_ANSWER)
    except http.HttpError as exc:
        raise DiscoveryError(f"service discovery {host}: {exc}") from exc
    return parse_sd_answer(body)
