"""A clone alone runs the suite: no test names a path beside or above the checkout.

tests/conftest.py also fails the session when a test opens such a path at run time; this
catches the literals in code paths a given run does not reach.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# /work/<x> beside the clone, a `shared` tree next to it, or climbing out of the clone.
OUTSIDE = re.compile(r"/work/(shared|main|wt)\b|\.\./shared|[\"']shared[\"']")


def test_no_test_names_a_path_outside_the_clone() -> None:
    sources = [*(REPO / "tests").rglob("*.py"), *(REPO / "tests").rglob("*.sh"), REPO / ".ci/run"]
    found = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for path in sources
        if path != Path(__file__).resolve()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not found, "\n".join(found)


def test_the_go_fixtures_are_inside_the_clone() -> None:
    fixtures = REPO / "tests" / "data" / "elkeid-go"
    assert (fixtures / "README.md").is_file()
    assert len(list(fixtures.glob("go-*.bin"))) == 5
