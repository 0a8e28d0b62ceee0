"""The self-upgrade's extractor against this build's own packages."""

from __future__ import annotations

import io

import pytest

from elkeid_agent.upgrade.artifact import ArtifactKind, extract_candidate

from .conftest import Dist

pytestmark = [pytest.mark.package, pytest.mark.timeout(1800)]


@pytest.mark.parametrize("kind", [ArtifactKind.DEB, ArtifactKind.RPM])
def test_executable_comes_out_of_our_packages_byte_identical(
    amd64_dist: Dist, kind: ArtifactKind
) -> None:
    package = amd64_dist.deb if kind is ArtifactKind.DEB else amd64_dist.rpm
    out = io.BytesIO()
    with package.open("rb") as src:
        assert extract_candidate(src, out) is kind
    assert out.getvalue() == amd64_dist.exe.read_bytes()
