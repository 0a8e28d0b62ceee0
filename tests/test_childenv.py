"""child_env(): children never see the launchers' variables or library paths."""

from __future__ import annotations

import subprocess
import sys

import pytest

from elkeid_agent.childenv import child_env

# What a staticx + PyInstaller onefile agent sees in its own environment.
FROZEN = {
    "PATH": "/usr/bin:/bin",
    "TMPDIR": "/etc/elkeid/tmp",
    "specified_idc": "idc1",
    "STATICX_BUNDLE_DIR": "/etc/elkeid/tmp/staticx-AbCdEf",
    "STATICX_PROG_PATH": "/etc/elkeid/elkeid-agent",
    "_PYI_APPLICATION_HOME_DIR": "/etc/elkeid/tmp/_MEI12345",
    "_PYI_ARCHIVE_FILE": "/etc/elkeid/tmp/staticx-AbCdEf/.staticx.prog",
    "_PYI_PARENT_PROCESS_LEVEL": "1",
    "_PYIBoot_SPLASH": "1",
    "_MEIPASS2": "/etc/elkeid/tmp/_MEI12345",
    "LD_LIBRARY_PATH": "/etc/elkeid/tmp/_MEI12345:/etc/elkeid/tmp/staticx-AbCdEf",
    "LD_LIBRARY_PATH_ORIG": "/etc/elkeid/tmp/staticx-AbCdEf",
}


def test_frozen_environment_is_cleaned() -> None:
    env = child_env(FROZEN)
    assert env == {"PATH": "/usr/bin:/bin", "TMPDIR": "/etc/elkeid/tmp", "specified_idc": "idc1"}


def test_original_ld_library_path_is_restored() -> None:
    base = dict(FROZEN, LD_LIBRARY_PATH_ORIG="/opt/vendor/lib:/etc/elkeid/tmp/staticx-AbCdEf")
    assert child_env(base)["LD_LIBRARY_PATH"] == "/opt/vendor/lib"


def test_ld_library_path_without_orig_drops_bundle_entries() -> None:
    base = {
        "LD_LIBRARY_PATH": "/etc/elkeid/tmp/_MEI12345/lib:/usr/local/lib",
        "_PYI_APPLICATION_HOME_DIR": "/etc/elkeid/tmp/_MEI12345",
    }
    assert child_env(base) == {"LD_LIBRARY_PATH": "/usr/local/lib"}


def test_plain_environment_passes_unchanged() -> None:
    base = {"PATH": "/bin", "LD_LIBRARY_PATH": "/opt/lib", "HOME": "/root"}
    assert child_env(base) == base


@pytest.mark.parametrize("orig", ["", ":"])
def test_empty_original_means_unset(orig: str) -> None:
    base = {"LD_LIBRARY_PATH": "/x/_MEI1", "LD_LIBRARY_PATH_ORIG": orig}
    assert "LD_LIBRARY_PATH" not in child_env(base)


def test_extra_wins_and_base_is_not_modified() -> None:
    base = dict(FROZEN)
    env = child_env(base, {"LD_LIBRARY_PATH": "/mine", "FOO": "1"})
    assert env["LD_LIBRARY_PATH"] == "/mine"
    assert env["FOO"] == "1"
    assert base == FROZEN


def test_similar_names_are_kept() -> None:
    base = {"MEI": "1", "PYI": "2", "MY_STATICX_X": "3", "staticx_lower": "4"}
    assert child_env(base) == base


def test_default_base_is_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("_MEIPASS2", "/tmp/_MEIabc")
    monkeypatch.setenv("ELKEID_CHILDENV_PROBE", "yes")
    env = child_env()
    assert "_MEIPASS2" not in env
    assert env["ELKEID_CHILDENV_PROBE"] == "yes"


def test_a_real_child_sees_the_cleaned_environment() -> None:
    env = child_env(dict(FROZEN, PATH="/usr/bin:/bin"))
    out = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(os.environ))"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "STATICX" not in out
    assert "_PYI" not in out
    assert "LD_LIBRARY_PATH" not in out


def test_service_manager_variables_stay_the_agents() -> None:
    """A plugin holding NOTIFY_SOCKET could feed the watchdog for a hung agent."""
    base = {
        "PATH": "/bin",
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": "42",
        "LISTEN_FDS": "1",
        "LISTEN_PID": "42",
        "LISTEN_FDNAMES": "x",
        "NOTIFY_SOCKETS_OF_MINE": "kept",  # only the exact name is the service manager's
    }
    assert child_env(base) == {"PATH": "/bin", "NOTIFY_SOCKETS_OF_MINE": "kept"}
