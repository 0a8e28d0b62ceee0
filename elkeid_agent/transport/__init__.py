"""Everything that talks to the AgentCenter: discovery, the Transfer stream, file upload."""
