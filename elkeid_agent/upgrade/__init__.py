"""Self-upgrade: fetch, extract, probe, swap, confirm or roll back (issue 6; docs/upgrade.md)."""
