"""The one source of the agent's version; the frozen build overwrites it from BUILD_VERSION."""

VERSION = "1.9.0.0"
PRODUCT = "elkeid-agent"
