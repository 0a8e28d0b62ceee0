"""The start-up memory trim: which mappings it pages out, and that it is harmless to run."""

from __future__ import annotations

import gc

from elkeid_agent.memory import read_only_file_mappings, trim_after_start

MAPS = """\
55d0c0a00000-55d0c0a21000 r--p 00000000 fe:01 1234  /usr/bin/python3.11
55d0c0a21000-55d0c0c00000 r-xp 00021000 fe:01 1234  /usr/bin/python3.11
55d0c0e00000-55d0c0e02000 rw-p 00200000 fe:01 1234  /usr/bin/python3.11
55d0c1000000-55d0c1200000 rw-p 00000000 00:00 0     [heap]
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
7f0000200000-7f0000300000 r-xp 00000000 fe:01 99    /tmp/_MEIabc/libpython3.11.so.1.0
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0     [stack]
7ffd00100000-7ffd00102000 r-xp 00000000 00:00 0     [vdso]
"""


def test_only_read_only_file_mappings_are_chosen() -> None:
    assert read_only_file_mappings(MAPS) == [
        (0x55D0C0A00000, 0x21000),
        (0x55D0C0A21000, 0x1DF000),
        (0x7F0000200000, 0x100000),
    ]


def test_trim_runs_in_this_process_and_keeps_it_working() -> None:
    try:
        trim_after_start()
        # Code paged out faults back in: the interpreter and its extensions still work.
        import hashlib

        assert hashlib.sha256(b"x").hexdigest().startswith("2d711642")
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
