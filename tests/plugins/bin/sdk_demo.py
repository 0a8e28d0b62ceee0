"""The SDK's demo plugin, as a test plugin (see elkeid_plugin_sdk/demo.py)."""

import os

from elkeid_plugin_sdk.demo import main

main(float(os.environ.get("DEMO_INTERVAL", "1")))
