"""Every worker's open client connections on one shared page, so that new connections
go to the worker that has fewest.

The workers share each listening socket's accept queue (no connection queued in it is
lost when a worker drains or dies). But the kernel wakes every worker for a new
connection and the first one awake takes it: in a burst, a worker that happens to be
scheduled first took up to all of 50 connections opened at once. So each worker writes
its count of open client connections on a page of memory the daemon shares with all
(``memfd``, handed to each worker as descriptor :data:`BOARD_FD`), the daemon marks
which workers serve, and before it accepts a connection a worker looks: when a serving
peer has :data:`MARGIN` fewer connections, it leaves the connection to that peer and
looks again after :data:`RECHECK` seconds (:class:`AcceptGate`). A peer that does not
take it within :data:`PATIENCE` (busy, or stopped) is not waited for: the worker
accepts until the counts are even again. A look is a few reads of the page, no system
call, no lock: each number has one writer (a worker its count, the daemon the flags),
and a stale read costs at most one connection placed less well.

The page: cell 0 holds the number of worker slots in use; slot ``i`` is cells
``1 + 2i`` (worker ``i``'s open connections) and ``2 + 2i`` (1 while it serves).
"""

from __future__ import annotations

import mmap
import os
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from relayd.config.checks import MAX_WORKERS

__all__ = ["BOARD_FD", "MARGIN", "PATIENCE", "RECHECK", "AcceptGate", "ConnectionBoard"]

#: The board's descriptor in a worker.
BOARD_FD = 4
#: A worker leaves a new connection to a serving peer with this many fewer open.
MARGIN = 2
#: Seconds between looks while a worker leaves new connections to a peer.
RECHECK = 0.002
#: Seconds a worker leaves new connections to a peer before it takes them itself.
PATIENCE = 0.05

_CELL = 8  # bytes: a signed 64-bit integer, written and read whole
_SIZE = mmap.PAGESIZE
assert (1 + 2 * MAX_WORKERS) * _CELL <= _SIZE


class ConnectionBoard:
    """The shared page, as the daemon or one worker sees it."""

    def __init__(self, descriptor: int) -> None:
        """Map the board held by ``descriptor`` (the caller keeps the descriptor)."""
        self._map = mmap.mmap(descriptor, _SIZE)
        self._cells = memoryview(self._map).cast("q")
        self._fd = descriptor

    @classmethod
    def create(cls) -> ConnectionBoard:
        """A new, empty board (the daemon's), in memory only."""
        descriptor = os.memfd_create("relayd-connections", os.MFD_CLOEXEC)
        os.ftruncate(descriptor, _SIZE)
        return cls(descriptor)

    def fileno(self) -> int:
        return self._fd

    # -- the daemon's side -------------------------------------------------------------

    def serving(self, index: int, serving: bool) -> None:
        """Mark worker ``index`` as serving (peers may leave connections to it) or not
        (starting, draining or gone: its count is cleared and no peer waits for it)."""
        cells = self._cells
        if serving:
            cells[0] = max(cells[0], index + 1)
            cells[2 + 2 * index] = 1
        else:
            cells[2 + 2 * index] = 0
            cells[1 + 2 * index] = 0

    # -- a worker's side ---------------------------------------------------------------

    def set_open(self, index: int, count: int) -> None:
        """Worker ``index`` has ``count`` client connections open."""
        self._cells[1 + 2 * index] = count

    def open_count(self, index: int) -> int:
        return self._cells[1 + 2 * index]

    def crowded(self, index: int) -> bool:
        """Whether a serving peer of worker ``index`` has :data:`MARGIN` fewer
        connections open than it."""
        cells = self._cells
        limit = cells[1 + 2 * index] - MARGIN
        if limit < 0:
            return False
        for slot in range(cells[0]):
            if slot != index and cells[2 + 2 * slot] and cells[1 + 2 * slot] <= limit:
                return True
        return False

    def close(self) -> None:
        self._cells.release()
        self._map.close()


class AcceptGate:
    """Wraps a listening port's ``doRead`` (its accept): while the board says the worker
    is crowded, the port stops reading and looks again after :data:`RECHECK`; after
    :data:`PATIENCE` of that it accepts anyway, until the counts are even again."""

    def __init__(self, port: Any, board: ConnectionBoard, index: int, clock: IReactorTime) -> None:
        self._port = port
        self._board = board
        self._index = index
        self._clock = clock
        self._accept = port.doRead
        self._waiting_since: float | None = None
        self._look: IDelayedCall | None = None
        port.doRead = self.doRead

    def doRead(self) -> Any:
        if self._board.crowded(self._index):
            now = self._clock.seconds()
            if self._waiting_since is None:
                self._waiting_since = now
            if now - self._waiting_since < PATIENCE:
                self._port.stopReading()
                if self._look is None:
                    self._look = self._clock.callLater(RECHECK, self._look_again)
                return None
        else:
            self._waiting_since = None
        return self._accept()

    def _look_again(self) -> None:
        self._look = None
        port = self._port
        if port.connected and not port.disconnecting:
            port.startReading()
