"""The fixed pool of I/O threads (workers.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_a_start_that_cannot_make_every_thread_goes_on_with_those_it_made() -> None:
    # A tasks limit (RLIMIT_NPROC, a cgroup's pids.max) met at start: the threads already in
    # the pool waited on a barrier that never filled, and the process hung at its exit (the
    # interpreter joins them) instead of ending or running with fewer threads.
    if os.geteuid() != 0:
        pytest.skip("a limit for another user needs root")
    # Imports first, as root; then a uid of its own (no other process under it to count).
    child = textwrap.dedent("""
        import os, resource
        from elkeid_agent.workers import started_pool
        os.setgid(64999)
        os.setuid(64999)
        resource.setrlimit(resource.RLIMIT_NPROC, (3, 3))
        pool = started_pool(6)
        print(pool.submit(lambda: 42).result(timeout=5))
    """)
    done = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True,
                          text=True, timeout=10, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "42"
    assert "I/O threads started" in done.stderr
