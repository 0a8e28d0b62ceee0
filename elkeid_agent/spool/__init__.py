"""The on-disk spool: records kept across outages, restarts and upgrades (docs/spool.md)."""
