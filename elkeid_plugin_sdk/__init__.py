"""Python plugin SDK for the Elkeid agent (the Go/Rust plugin library's surface).

    from elkeid_plugin_sdk import Client
    with Client() as client:
        client.send_record(5000, {"msg": "hello"})
        task = client.receive_task()

Standard library only; the agent never imports it.
"""

from elkeid_plugin_sdk.client import Client, Task, decode_task, encode_record

__all__ = ["Client", "Task", "decode_task", "encode_record"]
