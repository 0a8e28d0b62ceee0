"""Prometheus metrics for node_exporter's textfile collector (`[metrics] textfile`, off by default).

`render` is pure: the heartbeat's counters and samples in, the text exposition format out
(`# HELP`, `# TYPE`, one sample a line, names `elkeid_agent_*`). The agent writes it at each
heartbeat, off the event loop, through `fsutil.atomic_write`: node_exporter reads the old file
or the new one, never a part. The file holds no secret (counts and a version), so it is
world-readable as node_exporter, another user, needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from elkeid_agent.fsutil import atomic_write

PREFIX = "elkeid_agent_"

Value = int | float
Labels = tuple[tuple[str, str], ...]

# (metric, type, help, counter key): the plain ones, one sample each, from `Agent.counters()`.
_PLAIN: tuple[tuple[str, str, str, str], ...] = (
    ("records_sent_total", "counter", "Records written to the AgentCenter stream.", "tx_records"),
    ("bytes_sent_total", "counter", "Bytes of records written to the AgentCenter stream.",
     "tx_bytes"),
    ("connects_total", "counter", "Transfer streams opened since the agent started.", "connects"),
    ("connect_failures_total", "counter", "Connection rounds that reached no server.",
     "connect_failures"),
    ("buffer_bytes", "gauge", "Bytes of records queued in memory.", "buffer_bytes"),
    ("buffer_max_bytes", "gauge", "The memory buffer's bound (buffer.max_bytes).",
     "buffer_max_bytes"),
    ("spool_bytes", "gauge", "Bytes held in the on-disk spool.", "spool_bytes"),
    ("spool_records", "gauge", "Records held in the on-disk spool.", "spool_records"),
)
# Records the agent let go, by reason (architecture.md, principle 4).
_DROPPED: tuple[tuple[str, str], ...] = (
    ("agent_overflow", "dropped_agent_overflow"),
    ("oversize", "dropped_oversize"),
    ("spool_bound", "spool_dropped_records"),
    ("spool_corrupt", "spool_corrupt_entries"),
    ("log_rate", "log_records_suppressed"),
)


@dataclass(frozen=True)
class Sample:
    """What one heartbeat knows beyond `Agent.counters()`."""

    version: str
    connected: bool
    upgrade_held: bool
    rss_bytes: int
    cpu_seconds: float
    heartbeat_time: float
    plugins: Sequence[Mapping[str, str | int]] = ()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: Value) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: Sequence[tuple[Labels, Value]]) -> None:
        full = PREFIX + name
        self.lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}"]
        for labels, value in samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            selector = f"{full}{{{text}}}" if text else full
            self.lines.append(f"{selector} {_fmt(value)}")


def render(counters: Mapping[str, Value], sample: Sample) -> str:
    """The exposition text of one heartbeat (pure)."""
    out = _Text()
    out.family("build_info", "gauge", "The running agent's version, always 1.",
               [((("version", sample.version),), 1)])
    out.family("connected", "gauge", "1 while a Transfer stream is open.",
               [((), int(sample.connected))])
    out.family("last_heartbeat_timestamp_seconds", "gauge", "Unix time of the last heartbeat.",
               [((), sample.heartbeat_time)])
    for name, kind, help_text, key in _PLAIN:
        out.family(name, kind, help_text, [((), counters.get(key, 0))])
    out.family("reconnects_total", "counter", "Transfer streams opened after the first one.",
               [((), max(int(counters.get("connects", 0)) - 1, 0))])
    out.family("records_dropped_total", "counter", "Records the agent dropped, by reason.",
               [((("reason", reason),), counters.get(key, 0)) for reason, key in _DROPPED])
    out.family("resident_memory_bytes", "gauge",
               "Resident memory of the agent's processes (launchers included).",
               [((), sample.rss_bytes)])
    out.family("cpu_seconds_total", "counter", "CPU time (user and system) of the agent process.",
               [((), sample.cpu_seconds)])
    out.family("upgrade_held", "gauge", "1 while upgrades are held (upgrade.hold or ctl hold).",
               [((), int(sample.upgrade_held))])
    plugins = sample.plugins
    out.family("plugin_up", "gauge", "1 while the plugin runs.",
               [((("plugin", str(p["name"])),), int(p["state"] == "running")) for p in plugins])
    out.family("plugin_restarts_total", "counter", "Restarts of the plugin since it was started.",
               [((("plugin", str(p["name"])),), int(p["restarts"])) for p in plugins])
    out.family("plugin_frames_dropped_total", "counter",
               "Frames of the plugin dropped unread, by reason.",
               [((("plugin", str(p["name"])), ("reason", reason)), int(p[key]))
                for p in plugins
                for reason, key in (("malformed", "malformed_frames"),
                                    ("too_large", "too_large_frames"))])
    return "\n".join(out.lines) + "\n"


def write_textfile(path: Path, text: str) -> None:
    """Replace the textfile atomically (not durable: it is rewritten every heartbeat)."""
    atomic_write(path, text.encode(), 0o644, durable=False)
