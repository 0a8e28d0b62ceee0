"""Artifact signatures: the appended block's format, pinned publisher keys, the policy."""
