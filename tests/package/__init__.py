"""x86-64 frozen build and package tests (marked package). A package, so that its
conftest does not replace tests/conftest.py, which other test modules import."""
