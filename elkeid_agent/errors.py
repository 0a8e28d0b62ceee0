"""Exceptions that cross layers; every module may import this one (it imports nothing of ours)."""

from __future__ import annotations


class TaskFailed(Exception):
    """A task that cannot be carried out; the message goes back to the server in a 5100."""
