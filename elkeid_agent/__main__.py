from elkeid_agent.cli import main

raise SystemExit(main())
