"""Certificates read at each dial (issue 22, point 5): a client certificate, key and CA renewed
on disk are used at the next reconnect, same process; one close to its end is a warning in the
heartbeat and `ctl status`."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from agentproc import REPO, AgentProcess, patch_config, wait_until

from elkeid_agent.config import TlsConfig
from elkeid_agent.transport.tls import TlsMaterial
from elkeid_center.certs import generate_certs, generate_client_cert
from elkeid_center.server import ServerTls
from elkeid_center.testing import CenterThread


def install(dest: Path, ca: Path, cert: Path, key: Path) -> None:
    """Replace each file atomically, as a renewal tool would."""
    for src, name in ((ca, "ca.crt"), (cert, "client.crt"), (key, "client.key")):
        shutil.copyfile(src, dest / f".{name}.new")
        os.replace(dest / f".{name}.new", dest / name)


def test_expiry_warning_within_30_days(tmp_path: Path) -> None:
    pki = generate_certs(tmp_path / "pki")
    cert, key = generate_client_cert(pki, tmp_path / "soon", days_left=10)
    material = TlsMaterial.load(TlsConfig(ca=str(pki.ca), cert=str(cert), key=str(key)))
    now = datetime.datetime.now(datetime.UTC)
    warning = material.expiry_warning(now)
    assert warning.startswith(f"tls.cert {cert} expires on ")
    assert warning.endswith(("(10 days left)", "(9 days left)"))
    fresh = TlsMaterial.load(
        TlsConfig(ca=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key)))
    assert fresh.expiry_warning(now) == ""


def test_renewed_certificates_are_used_at_the_next_dial_same_pid(tmp_path: Path) -> None:
    pki_a = generate_certs(tmp_path / "pki-a")
    mine = tmp_path / "agent-certs"
    mine.mkdir()
    install(mine, pki_a.ca, pki_a.client_cert, pki_a.client_key)
    with CenterThread(pki_a.directory) as center:
        config = patch_config(
            center.write_agent_config(tmp_path / "agent.toml", tmp_path / "work"),
            tls={"ca": str(mine / "ca.crt"), "cert": str(mine / "client.crt"),
                 "key": str(mine / "client.key")},
            transport={"heartbeat_interval": 0.5, "backoff_max": 2.0},
        )
        with AgentProcess(config) as agent:
            center.wait_connected(timeout=15)
            center.wait_records(1000, timeout=15)
            assert center.records(1000)[-1].fields["warnings"] == ""
            # A new PKI: the center presents a chain of a new CA and accepts only its
            # clients; the agent's renewed files are of that CA, the cert ending in 10 days.
            pki_b = generate_certs(tmp_path / "pki-b")
            cert_b, key_b = generate_client_cert(pki_b, tmp_path / "renewed", days_left=10)
            center.center.grpc.tls = ServerTls.from_certs(pki_b)
            install(mine, pki_b.ca, cert_b, key_b)
            before = len(center.connections())
            center.restart()

            def renewed_beat() -> bool:
                return any(c.first_heartbeat_at for c in center.connections()[before:])

            wait_until(renewed_beat, 30)
            assert agent.proc is not None
            assert agent.proc.poll() is None  # the same process: no restart
            beat = wait_until(lambda: [r for r in center.records(1000)
                                       if "days left" in r.fields.get("warnings", "")], 10)
            assert str(mine / "client.crt") in beat[-1].fields["warnings"]
            status = subprocess.run(
                [sys.executable, "-m", "elkeid_agent", "ctl", "--work-dir",
                 str(agent.work_dir), "status", "--json"],
                env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                timeout=60, check=True,
            )
            assert any("days left" in w for w in json.loads(status.stdout)["warnings"])
            agent.stop()
        assert "certificates changed on disk" in agent.log()
