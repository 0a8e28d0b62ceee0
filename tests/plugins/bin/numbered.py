"""Test and bench plugin: numbered records, written as the Go and Rust libraries write them:
one record at a time into a 512 KiB buffer flushed every 200 ms (and when full).

RATE records/s (default 5000), ~PAD bytes of padding (default 200). Each record carries
`run` (this process's pid, unique across agent restarts) and `seq`. After every flush and at
exit, `$COUNT_DIR/<pid>` holds how many records this process generated, so a test can tell
produced from delivered even when the agent (and then this plugin) is killed.
"""

import os
import signal
import struct
import sys
import threading
import time

from elkeid_plugin_sdk.client import encode_record

BUFFER = 512 * 1024
FLUSH_EVERY = 0.2
rate = float(os.environ.get("RATE", "5000"))
pad = "p" * int(os.environ.get("PAD", "200"))
count_dir = os.environ.get("COUNT_DIR", ".")
run = str(os.getpid())
out = os.fdopen(4, "wb", buffering=0)
buf = bytearray()
seq = 0
stop = threading.Event()


def save() -> None:
    path = os.path.join(count_dir, run)
    with open(path + ".tmp", "w") as f:
        f.write(str(seq))
    os.replace(path + ".tmp", path)


def flush() -> None:
    global buf
    if buf:
        data, buf = bytes(buf), bytearray()
        out.write(data)
    save()


def watch_tasks() -> None:
    # The agent closes the task pipe to ask for an orderly exit.
    while os.read(3, 65536):
        pass
    stop.set()


signal.signal(signal.SIGTERM, lambda *_: stop.set())
threading.Thread(target=watch_tasks, daemon=True).start()
began = time.monotonic()
next_flush = began + FLUSH_EVERY
try:
    while not stop.is_set():
        now = time.monotonic()
        due = int((now - began) * rate)
        while seq < due:
            body = encode_record(9999, int(time.time()), {"run": run, "seq": str(seq), "pad": pad})
            frame = struct.pack("<I", len(body)) + body
            if len(buf) + len(frame) > BUFFER:
                flush()
            buf += frame
            seq += 1
        if now >= next_flush:
            flush()
            next_flush += FLUSH_EVERY
        time.sleep(0.005)
    flush()
except BrokenPipeError:
    save()
    sys.exit(0)
