"""Demo plugin: a record every second, and an answer record for every task.

Install as `<workdir>/plugin/demo/demo` (a two-line shell wrapper running
`python -m elkeid_plugin_sdk.demo`). Records: 5999 `{"seq", "pid"}` every second; each task
gets a 5998 `{"token", "data_type", "data"}` reply, sent on the high-priority pipe.
The plugin exits when the agent closes the task pipe.
"""

from __future__ import annotations

import os
import threading

from elkeid_plugin_sdk import Client

TICK = 5999
REPLY = 5998


def main(interval: float = 1.0) -> None:
    client = Client()
    done = threading.Event()

    def answer() -> None:
        try:
            while True:
                task = client.receive_task()
                fields = {"token": task.token, "data_type": str(task.data_type), "data": task.data}
                client.send_record(REPLY, fields, high_priority=True)
        except EOFError:
            pass
        finally:
            done.set()

    reader = threading.Thread(target=answer, name="tasks", daemon=True)
    reader.start()
    seq = 0
    while not done.wait(interval):
        client.send_record(TICK, {"seq": str(seq), "pid": str(os.getpid())})
        seq += 1
    client.close()


if __name__ == "__main__":
    main(float(os.environ.get("DEMO_INTERVAL", "1")))
