"""The committed protobuf modules are exactly what tools/gen_proto.py makes from proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "elkeid_agent" / "_proto"


def test_generated_modules_are_fresh(tmp_path: Path) -> None:
    out = tmp_path / "_proto"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_proto.py"), str(out)],
        check=True,
        cwd=tmp_path,
        timeout=120,
    )
    generated = sorted(p.name for p in out.iterdir() if p.is_file())
    committed = sorted(p.name for p in COMMITTED.iterdir() if p.is_file())
    assert generated == committed, "run `make proto`: the set of generated files changed"
    stale = [
        name for name in generated if (out / name).read_bytes() != (COMMITTED / name).read_bytes()
    ]
    assert not stale, f"run `make proto`: stale generated modules {stale}"
    # Every proto/*.proto is generated (a new .proto not listed in gen_proto.py is stale too).
    protos = {p.stem for p in (ROOT / "proto").glob("*.proto")}
    assert {f"{name}_pb2.py" for name in protos} <= set(generated)
