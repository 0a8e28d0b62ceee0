"""A local, AgentCenter-compatible server for tests, demos and plugin authors.

Never imported by the agent. `elkeid_center.testing.CenterThread` is the entry point
for tests; `elkeid-center serve` (cli.py) for people.
"""
