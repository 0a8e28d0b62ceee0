"""Secrets never leave the process in text (issue 22, point 7): URL credentials are masked in
every log line, state_detail, heartbeat and status.json; status.json is not world-readable."""

from __future__ import annotations

from pathlib import Path

import pytest
from agentproc import AgentProcess, patch_config, wait_until

from elkeid_agent.http import HttpError, parse_url
from elkeid_agent.proxyenv import ProxyConfigError, parse_proxy
from elkeid_agent.redact import redact, redact_mapping
from elkeid_agent.status import STATUS_FILE
from elkeid_center.testing import CenterThread

SECRET = "Sekr3tPw"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://u:pw@h:1/x", "http://***@h:1/x"),
        ("see https://user@host/a and http://a:b@c/", "see https://***@host/a and http://***@c/"),
        # A password with / # ? : or @ (malformed, as typed): all of it is hidden.
        (f"'http://u:{SECRET}/x#y@h:3128'", "'http://***@h:3128'"),
        (f"http://u:p@{SECRET}@h", "http://***@h"),
        ("mailto-free text with an @ sign", "mailto-free text with an @ sign"),
        ("http://host/path", "http://host/path"),
        # Glued to a word character before it (a plugin's `error_http://...`).
        (f"error_http://u:{SECRET}@h", "error_http://***@h"),
        (f"1https://u:{SECRET}@h", "1https://***@h"),
    ],
)
def test_redact_masks_userinfo(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_redact_mapping_removes_secret_named_values() -> None:
    assert redact_mapping({"proxy_password": "x", "HTTP_PROXY": "http://u:p@h:1", "a": "b"}) == {
        "proxy_password": "***", "HTTP_PROXY": "http://***@h:1", "a": "b"
    }


@pytest.mark.parametrize(
    "value",
    [f"http://user:{SECRET}/rest@proxy:3128", f"http://user:{SECRET}#x@proxy:3128",
     f"http://user:{SECRET}?x@proxy:99999", "http://user:31337/rest@proxy:3128",
     f"user:{SECRET}/rest@proxy:3128"],
)
def test_malformed_proxy_url_error_quotes_no_part_of_the_password(value: str) -> None:
    with pytest.raises(ProxyConfigError) as caught:
        parse_proxy("HTTP_PROXY", value)
    assert SECRET not in str(caught.value)
    assert "31337" not in str(caught.value)
    assert "user" not in str(caught.value)
    assert "HTTP_PROXY is not a valid proxy URL" in str(caught.value)


def test_url_errors_mask_credentials() -> None:
    with pytest.raises(HttpError) as caught:
        parse_url(f"http://u:{SECRET}@h:port/x")
    assert SECRET not in str(caught.value)
    assert "http://***@h:port/x" in str(caught.value)


def test_agent_sends_and_writes_no_credentials(tmp_path: Path) -> None:
    """A malformed HTTP_PROXY and a download URL with credentials: the sync fails, and
    neither password reaches the log, state_detail, the heartbeat or status.json."""
    with CenterThread(tmp_path / "certs") as center:
        center.set_configs([{
            "name": "leaky", "version": "1", "sha256": "0" * 64,
            "download_urls": [
                # Not loopback, so the proxy is consulted (and found malformed).
                "http://files.example.invalid/leaky.tar.gz",
                f"http://user:{SECRET}@127.0.0.1:1/leaky.tar.gz",
            ],
        }])
        config = patch_config(
            center.write_agent_config(tmp_path / "agent.toml", tmp_path / "work"),
            transport={"heartbeat_interval": 0.5},
        )
        env = {"HTTP_PROXY": f"http://user:{SECRET}/more@proxy.invalid:3128"}
        with AgentProcess(config, env) as agent:
            status = agent.work_dir / STATUS_FILE

            def failed_beat() -> bool:
                return any("leaky" in r.fields.get("state_detail", "")
                           for r in center.records(1000))

            wait_until(failed_beat, 30)
            wait_until(lambda: "leaky" in status.read_text(), 10)
            text = status.read_text()
            assert "HTTP_PROXY is not a valid proxy URL" in text
            assert "http://***@127.0.0.1:1/leaky.tar.gz" in text
            assert status.stat().st_mode & 0o007 == 0
            agent.stop()
            log = agent.log()
        assert "not a valid proxy URL" in log
        sent = [r.raw for r in center.records()]
    for where, data in [("status.json", text.encode()), ("log", log.encode()), *(
        (f"record {i}", raw) for i, raw in enumerate(sent)
    )]:
        assert SECRET.encode() not in data, where


def test_redact_is_linear_on_hostile_text() -> None:
    import time

    started = time.monotonic()
    assert redact("@" + "http://" * 20000) == "@" + "http://" * 20000
    assert time.monotonic() - started < 5  # quadratic would take minutes


def test_the_heartbeat_ring_keeps_no_url_credentials() -> None:
    """A plugin's last_exit quotes its stderr's last line, which may hold a URL's password."""
    from elkeid_agent.heartbeat_ring import HeartbeatRing

    ring = HeartbeatRing()
    ring.add(1.0, {"state": "running"}, [{
        "name": "p", "restarts": 1,
        "last_exit": "exit 1; p.stderr: GET http://ops:S3cretPw@files.invalid/x failed"}])
    assert b"S3cretPw" not in ring.encode()
    assert b"http://***@files.invalid/x" in ring.encode()
