"""Startup cost of the frozen executable: size, `--version` and `selftest` wall time.

    python bench/startup.py [--exe PATH] [--runs 10] [--quota 10]

Times `--version` (median of --runs) of the shipped executable and, in the same run, of
named baselines: plain `python -m elkeid_agent --version` from the project venv and,
when the build left it beside the executable, PyInstaller's onefile before the staticx
wrap. Each is timed unconstrained and inside a cgroup with a --quota % CPU limit (the
unit's CPUQuota=10 %): cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`, whichever this
machine mounts. Needs root for the cgroup; without it that column says why it is empty.

Every run unpacks under a fresh exec-capable TMPDIR (as the unit's /etc/elkeid/tmp), so
nothing is cached between runs but the page cache. Targets (issue 4): <= 25 MB and
<= 0.5 s unconstrained.

`selftest --config C` is the self-upgrade's deep probe (docs/upgrade.md): it imports the
whole run path, reads a config (C: a throwaway one with the test PKI of
build/out/test-certs) and builds the gRPC channel objects. Target (issue 13): within the
upgrade's probe_timeout (60 s) under the quota.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
#: The upgrade's default probe_timeout (elkeid_agent.upgrade.settings.UpgradeSettings).
PROBE_TIMEOUT = 60.0
CGROUP_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000


@contextmanager
def cpu_quota_cgroup(percent: int) -> Iterator[Path]:
    """A fresh cgroup limited to `percent` of one CPU; yields its procs file."""
    name = f"elkeid-bench-{os.getpid()}"
    quota = PERIOD_US * percent // 100
    if (CGROUP_ROOT / "cgroup.controllers").is_file():  # unified (v2) hierarchy
        group = CGROUP_ROOT / name
        group.mkdir()
        (group / "cpu.max").write_text(f"{quota} {PERIOD_US}\n")
    else:
        group = CGROUP_ROOT / "cpu" / name
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text(f"{PERIOD_US}\n")
        (group / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    try:
        yield group / "cgroup.procs"
    finally:
        # The group must be empty to go; every timed child has exited by now.
        group.rmdir()


def time_once(cmd: list[str], tmp_root: Path, procs: Path | None) -> float:
    tmpdir = Path(tempfile.mkdtemp(dir=tmp_root))
    env = dict(os.environ, TMPDIR=str(tmpdir))

    def join_cgroup() -> None:
        if procs is not None:
            procs.write_text(f"{os.getpid()}\n")

    start = time.perf_counter()
    out = subprocess.run(
        cmd, env=env, capture_output=True, text=True, check=True, preexec_fn=join_cgroup
    )
    elapsed = time.perf_counter() - start
    shutil.rmtree(tmpdir)
    if not out.stdout.strip():
        raise RuntimeError(f"{cmd} printed nothing")
    return elapsed


def median_time(cmd: list[str], runs: int, tmp_root: Path, procs: Path | None) -> float:
    time_once(cmd, tmp_root, procs)  # warm the page cache; not counted
    return statistics.median(time_once(cmd, tmp_root, procs) for _ in range(runs))


def default_exe() -> Path | None:
    built = PROJECT / "build" / "out" / "amd64" / "elkeid-agent"
    if built.is_file():
        return built
    dists = sorted((PROJECT / "dist").glob("elkeid-agent-*-linux-amd64"), key=os.path.getmtime)
    return dists[-1] if dists else None


def selftest_config(directory: Path) -> Path:
    """A config the selftest accepts: the test PKI, a region with one address, never dialed."""
    certs = PROJECT / "build" / "out" / "test-certs"
    if not (certs / "client.key").is_file():
        subprocess.run([sys.executable, str(PROJECT / "build" / "gen-test-certs.py"), str(certs)],
                       check=True, capture_output=True)
    config = directory / "selftest.toml"
    config.write_text(
        f'work_dir = "{directory / "work"}"\n[tls]\nca = "{certs / "ca.crt"}"\n'
        f'cert = "{certs / "client.crt"}"\nkey = "{certs / "client.key"}"\n'
        '[regions.default]\nprivate = "127.0.0.1:1"\n'
    )
    return config


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exe", type=Path, default=None, help="the executable (default: last build)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--quota", type=int, default=10, help="CPU quota in percent of one CPU")
    args = ap.parse_args()
    exe = args.exe or default_exe()
    if exe is None or not exe.is_file():
        sys.exit("no executable: run `make dist` or pass --exe")

    # Under the exec-capable project tree, not /tmp (which may be noexec).
    tmp_root = Path(tempfile.mkdtemp(prefix="bench-", dir=PROJECT / "build" / "out"))
    config = selftest_config(tmp_root)
    cases: list[tuple[str, list[str]]] = [
        ("frozen (staticx + onefile)", [str(exe.resolve()), "--version"]),
        ("frozen: selftest (upgrade probe)",
         [str(exe.resolve()), "selftest", "--config", str(config)]),
    ]
    onefile = exe.with_name(exe.name + ".onefile")
    if onefile.is_file():
        cases.append(("baseline: PyInstaller onefile", [str(onefile.resolve()), "--version"]))
    venv_python = PROJECT / ".venv" / "bin" / "python"
    python = str(venv_python) if venv_python.is_file() else sys.executable
    cases.append(("baseline: python -m elkeid_agent", [python, "-m", "elkeid_agent", "--version"]))

    size = exe.stat().st_size
    print(f"executable: {exe}")
    print(f"size: {size} bytes ({size / 1e6:.1f} MB, {size / 2**20:.1f} MiB)")
    print(f"--version (and selftest) wall time, median of {args.runs} runs:")
    print(f"  {'what':34} {'unconstrained':>14} {f'{args.quota}% CPU':>12}")
    try:
        for label, cmd in cases:
            free = median_time(cmd, args.runs, tmp_root, None)
            try:
                with cpu_quota_cgroup(args.quota) as procs:
                    limited = f"{median_time(cmd, args.runs, tmp_root, procs):11.3f}s"
            except OSError as exc:
                limited = f"n/a ({exc.strerror})"
            print(f"  {label:34} {free:13.3f}s {limited:>12}", flush=True)
        print(f"selftest target: within the upgrade's probe_timeout, {PROBE_TIMEOUT:g} s, "
              f"at {args.quota}% CPU")
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
