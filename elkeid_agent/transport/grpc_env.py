"""Import grpc only through here: its environment must be set before the first import.

Fork support makes gRPC install fork handlers that fight uvloop and posix_spawn; its own
logging would write to stderr past our log handlers.
"""

from __future__ import annotations

import os

os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
os.environ.setdefault("GRPC_TRACE", "")

import grpc
import grpc.aio

__all__ = ["grpc"]
