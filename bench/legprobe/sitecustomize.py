"""The socket-level probe of ``bench/leg_timing.py``, loaded by a proxy process through
``PYTHONPATH`` (Python imports ``sitecustomize`` at start-up).

It wraps ``twisted.internet.tcp.Connection.doRead`` and ``doWrite`` to note when each
starts (``time.perf_counter``) and whether the connection is outgoing (an upstream
one) or accepted (a client's), and writes the notes at exit to the file named by
``LEG_TIMING_OUT``. Nothing else of the process changes.
"""

from __future__ import annotations

import atexit
import os
import pickle
import time
from typing import Any

_notes: list[tuple[float, str, bool]] = []


def _install() -> None:
    from twisted.internet import tcp

    connection: Any = tcp.Connection
    read, write, outgoing = connection.doRead, connection.doWrite, tcp.Client
    note, clock = _notes.append, time.perf_counter

    def do_read(self: Any) -> Any:
        note((clock(), "read", isinstance(self, outgoing)))
        return read(self)

    def do_write(self: Any) -> Any:
        note((clock(), "write", isinstance(self, outgoing)))
        return write(self)

    connection.doRead = do_read
    connection.doWrite = do_write


def _dump() -> None:
    out = os.environ.get("LEG_TIMING_OUT")
    if out:
        with open(out, "wb") as f:
            pickle.dump(_notes, f)


if os.environ.get("LEG_TIMING_OUT"):
    _install()
    atexit.register(_dump)
