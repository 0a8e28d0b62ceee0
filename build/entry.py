"""Entry point of the frozen executable (PyInstaller needs a script, not a module)."""

from elkeid_agent.cli import main

raise SystemExit(main())
