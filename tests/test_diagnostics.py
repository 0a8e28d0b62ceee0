"""`elkeid-agent diagnostics` (issue 22, point 1): one bounded tar.gz, from a running agent and
from a stopped one, listing what it holds, with no byte of the private key or a proxy password."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from agentproc import REPO, AgentProcess, patch_config, wait_until

from elkeid_agent.diagnostics import MAX_BUNDLE_BYTES, Bundle, Scrubber, cgroup_text
from elkeid_center.testing import CenterThread

PASSWORD = "Pr0xyS3cretPass"
PREFIX = "elkeid-agent-diagnostics/"


def diagnostics(config: Path, output: Path, env: dict[str, str]) -> dict[str, bytes]:
    done = subprocess.run(
        [sys.executable, "-m", "elkeid_agent", "diagnostics", "--config", str(config),
         "--output", str(output)],
        env={**os.environ, "PYTHONPATH": str(REPO), **env}, capture_output=True, text=True,
        timeout=240, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert output.stat().st_size < MAX_BUNDLE_BYTES
    assert output.stat().st_mode & 0o077 == 0
    with tarfile.open(output) as tar:
        members = {}
        for info in tar.getmembers():
            fh = tar.extractfile(info)
            assert fh is not None
            members[info.name.removeprefix(PREFIX)] = fh.read()
    return members


def key_lines(key: Path) -> list[bytes]:
    lines = [ln.strip() for ln in key.read_bytes().splitlines()]
    body = [ln for ln in lines if ln and not ln.startswith(b"-----")]
    return [*body, b"".join(body)]


def check_bundle(members: dict[str, bytes], key: Path) -> dict[str, object]:
    manifest = json.loads(members["manifest.json"])
    listed = {m["name"] for m in manifest["members"]}
    assert listed == set(members) - {"manifest.json"}
    assert {"version.json", "config.json", "environment.json", "doctor.txt",
            "ctl-status.json", "heartbeats.json", "log/elkeid-agent.log", "spool.json",
            "cgroup.txt", "os.txt", "plugins/noisy/noisy.stderr",
            "plugins/noisy/state.json"} <= listed
    for name, data in members.items():
        assert PASSWORD.encode() not in data, name
        for line in key_lines(key):
            assert line not in data, name
    return manifest


def test_bundle_from_a_running_then_a_stopped_agent(tmp_path: Path) -> None:
    with CenterThread(tmp_path / "certs") as center:
        config = patch_config(
            center.write_agent_config(tmp_path / "agent.toml", tmp_path / "work"),
            transport={"heartbeat_interval": 0.3},
        )
        key = center.certs.client_key
        env = {"HTTPS_PROXY": f"http://ops:{PASSWORD}@proxy.invalid:3128",
               "HTTP_PROXY": f"http://ops:{PASSWORD}/x@proxy.invalid:3128"}
        work = tmp_path / "work"
        # What a plugin might print: the key itself, a URL with the password.
        noisy = work / "plugin" / "noisy"
        noisy.mkdir(parents=True)
        (noisy / "noisy.stderr").write_bytes(
            b"starting\n" + key.read_bytes() + f"proxy http://ops:{PASSWORD}@p:1\n".encode())
        with AgentProcess(config, env) as agent:
            center.wait_records(1000, count=2, timeout=20)
            wait_until((work / "heartbeats.json").exists, 10)
            running = diagnostics(config, tmp_path / "running.tar.gz", env)
            agent.stop()
        stopped = diagnostics(config, tmp_path / "stopped.tar.gz", env)

    check_bundle(running, key)
    status = json.loads(running["ctl-status.json"])
    assert status["running"] is True
    assert json.loads(running["heartbeats.json"])[-1]["fields"]["state"]
    assert b"connect private" in running["doctor.txt"]
    assert b" started, id " in running["log/elkeid-agent.log"]
    # The key's lines the plugin printed are masked, the rest of its stderr kept.
    assert running["plugins/noisy/noisy.stderr"].startswith(b"starting\n-----BEGIN")
    assert json.loads(running["environment.json"])["HTTPS_PROXY"] == (
        "http://***@proxy.invalid:3128")
    if Path("/etc/os-release").exists():  # a link on Debian: system files are followed
        assert b"ID=" in running["os.txt"]
    config_json = json.loads(running["config.json"])
    assert config_json["tls"]["key"] == str(key)  # the path, never the key

    check_bundle(stopped, key)
    assert json.loads(stopped["ctl-status.json"])["state"] == "stopped"


def test_members_are_cut_to_the_bound(tmp_path: Path) -> None:
    bundle = Bundle(Scrubber([]))
    big = os.urandom(3 * 1024 * 1024)
    bundle.add("a", big, "test")
    bundle.add("b", big, "test")
    data = bundle.tar_gz({})
    assert len(data) < MAX_BUNDLE_BYTES
    assert "cut" in bundle.manifest[1]["note"]
    assert bundle.members[1][1] == bundle.scrubber.data(big)[-len(bundle.members[1][1]):]


def test_cgroup_limits_read_from_a_v2_tree(tmp_path: Path) -> None:
    (tmp_path / "proc/7").mkdir(parents=True)
    (tmp_path / "proc/7/cgroup").write_text("0::/system.slice/elkeid-agent.service\n")
    group = tmp_path / "sys/fs/cgroup/system.slice/elkeid-agent.service"
    group.mkdir(parents=True)
    (group / "memory.max").write_text("262144000\n")
    (group / "cpu.max").write_text("10000 100000\n")
    text = cgroup_text(7, tmp_path)
    assert "elkeid-agent.service/memory.max: 262144000" in text
    assert "cpu.max: 10000 100000" in text


@pytest.mark.parametrize(("value", "password"), [
    ("http://u:pw@h:1", "pw"), (f"http://u:{PASSWORD}/x#y@h:1", f"{PASSWORD}/x#y"),
    ("u:p@h", "p"), ("http://h:1", ""),
])
def test_proxy_password_as_typed(value: str, password: str) -> None:
    from elkeid_agent.diagnostics import proxy_password

    assert proxy_password(value) == password


def test_plugin_files_are_read_only_when_regular_and_not_through_links(tmp_path: Path) -> None:
    from elkeid_agent.diagnostics import read_head, read_tail

    secret = tmp_path / "secret"
    secret.write_text("root:$6$hash\n")
    (tmp_path / "link.stderr").symlink_to(secret)
    os.mkfifo(tmp_path / "fifo.stderr")  # opening it blocking would hang the bundle
    for reader in (read_head, read_tail):
        assert reader(tmp_path / "link.stderr", 1024)[0] == b""
        assert reader(tmp_path / "fifo.stderr", 1024) == (b"", "not read: not a regular file")
    assert read_head(secret, 1024) == (b"root:$6$hash\n", "")
    # A cut keeps whole lines only, so a key line is never left half there.
    (tmp_path / "lines").write_bytes(b"aaaa\nbbbbbbbb\n")
    assert read_head(tmp_path / "lines", 8)[0] == b"aaaa\n"
    assert read_tail(tmp_path / "lines", 12)[0] == b"bbbbbbbb\n"


def test_proxy_passwords_set_in_the_unit_are_masked_everywhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's proxy comes from its unit (a drop-in's Environment=), not from the shell
    root runs diagnostics in: a scheme-less value (Go's and the agent's `user:pw@host:port`)
    or a quoted one holding a blank is no URL redact() recognises."""
    from elkeid_agent import diagnostics as diag

    dropins = tmp_path / "units" / "elkeid-agent.service.d"
    dropins.mkdir(parents=True)
    (dropins / "proxy.conf").write_text(
        f"[Service]\nEnvironment=HTTPS_PROXY=ops:{PASSWORD}@proxy.invalid:3128 "
        f"\"HTTP_PROXY=http://ops:{PASSWORD} 2@proxy.invalid:3128\"\n")
    monkeypatch.setattr(diag, "UNIT_DIRS", (str(tmp_path / "units"),))
    work = tmp_path / "work"
    noisy = work / "plugin" / "noisy"
    noisy.mkdir(parents=True)
    (noisy / "noisy.stderr").write_text(f"via ops:{PASSWORD}@proxy.invalid:3128\n")
    config = tmp_path / "agent.toml"
    config.write_text(f'work_dir = "{work}"\n')
    bundle, _ = diag.collect(str(config), {"PATH": os.environ.get("PATH", "")})
    members = dict(bundle.members)
    assert "systemd" + str(dropins / "proxy.conf") in members
    assert b"proxy.invalid:3128" in members["systemd" + str(dropins / "proxy.conf")]
    for name, data in members.items():
        assert PASSWORD.encode() not in data, name


def test_the_running_agents_proxy_password_is_read_from_its_process() -> None:
    from elkeid_agent.diagnostics import process_passwords

    child = subprocess.Popen(["sleep", "30"], env={"HTTPS_PROXY": f"ops:{PASSWORD}@p:1",
                                                   "NO_PROXY": "x"})
    try:
        assert process_passwords(child.pid) == [PASSWORD]
    finally:
        child.kill()
        child.wait()


def test_the_subcommands_it_runs_never_import_from_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root running diagnostics from a directory another user can write (/tmp) must not
    run that user's `elkeid_agent` package: `python -m` puts the current directory first."""
    from elkeid_agent.diagnostics import run_self

    planted = tmp_path / "elkeid_agent"
    planted.mkdir()
    (planted / "__init__.py").write_text("")
    (planted / "__main__.py").write_text(
        f"open({str(tmp_path / 'owned')!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path)
    out, note = run_self(["--version"], 60)
    assert not (tmp_path / "owned").exists()
    assert note == "exit status 0", out
