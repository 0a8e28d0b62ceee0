"""Test plugin: COUNT records of ~300 bytes with a `seq` field, as fast as the pipe takes them
(RATE=n limits to n records/s), then waits for the task pipe to close."""

import contextlib
import os
import sys
import time

from elkeid_plugin_sdk import Client

count = int(os.environ.get("COUNT", "0")) or sys.maxsize
rate = float(os.environ.get("RATE", "0"))
duration = float(os.environ.get("DURATION", "0"))
client = Client()
pad = "p" * 240
began = time.monotonic()
i = 0
while i < count:
    if rate:
        ahead = began + i / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    if duration and time.monotonic() - began > duration:
        break
    client.send_record(9999, {"seq": str(i), "pad": pad, "host": "bench"})
    i += 1
client.flush()
with contextlib.suppress(EOFError):
    client.receive_task()
