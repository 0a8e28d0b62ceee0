"""elkeid-agent: a drop-in Python replacement for the Elkeid host agent."""
