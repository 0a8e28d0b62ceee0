"""`elkeid-agent --version` stays lean: the upgrade's first probe and the start-up target
(under 0.5 s frozen, docs/packaging.md "Start-up") depend on it importing next to nothing."""

from __future__ import annotations

import json
import subprocess
import sys

from elkeid_agent.version import VERSION

#: Modules a regression would drag into `--version`: each cost the frozen start 5-80 ms.
HEAVY = ("argparse", "elkeid_agent.ctl", "msgspec", "logging", "subprocess", "pathlib",
         "psutil", "grpc", "uvloop", "google.protobuf", "elkeid_agent.config", "cryptography")

PROBE = """
import io, json, sys
from contextlib import redirect_stdout
before = set(sys.modules)
out = io.StringIO()
with redirect_stdout(out):
    from elkeid_agent.cli import main
    code = main(["--version"])
print(json.dumps({"code": code, "out": out.getvalue(),
                  "loaded": sorted(set(sys.modules) - before)}))
"""


def run_probe() -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          check=True, timeout=60)
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


def test_version_answers_without_loading_the_subcommands() -> None:
    answer = run_probe()
    assert answer["code"] == 0
    assert answer["out"] == VERSION + "\n"
    loaded = answer["loaded"]
    assert isinstance(loaded, list)
    assert [m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY)] == []
    assert "elkeid_agent.cli" in loaded  # the probe did run the real entry point


def test_version_among_other_arguments_goes_through_the_parser() -> None:
    done = subprocess.run([sys.executable, "-m", "elkeid_agent", "--version", "run"],
                          check=False, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, VERSION + "\n")
