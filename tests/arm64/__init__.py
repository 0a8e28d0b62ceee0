"""aarch64 build tests (marked arm64). A package, so that its conftest does not replace
tests/conftest.py, which other test modules import as `conftest`."""
