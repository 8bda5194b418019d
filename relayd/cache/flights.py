"""A request on its way upstream, captured for the cache and shared with identical ones.

A :class:`Capture` sees every byte the relay writes to the client of a cacheable request
that missed (the request's ``tap``, :class:`relayd.http.site.RelayRequest`): the status
and headers at the first write, then the body, for a stream each event as it goes. Only
a 200 is captured; past ``limit`` bytes the capture stops keeping bytes (the answer is
too large to store) but still hands them to the joiners it has.

With coalescing, the capture is also the *flight* identical requests join
(:attr:`relayd.cache.store.ResponseCache.flights`): a :class:`Joiner` of a stream gets
the head and the bytes sent so far at once, then the rest as they come; a joiner of a
JSON answer gets the stored entry at the end. When the capture closes without an entry
(the answer was not a complete 200, or too large), joiners that got nothing yet go
upstream themselves; joiners of a stream already under way get its end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from relayd.cache.entry import CachedAnswer, kept_headers

__all__ = ["KEEPALIVE", "Capture", "Joiner"]

#: The SSE comment relayd sends during upstream silence: never part of a stored stream.
KEEPALIVE = b": keepalive\n\n"


class Joiner(Protocol):
    """A request waiting for a flight's answer."""

    def flight_started(self, status: int, headers: tuple[tuple[bytes, bytes], ...]) -> None: ...

    def flight_data(self, data: bytes) -> None: ...

    def flight_ended(self, entry: CachedAnswer | None, finished: bool) -> None: ...


class Capture:
    """The bytes one upstream answer sends its client (see the module's docstring)."""

    __slots__ = (
        "chunks",
        "closed",
        "deserted",
        "finished",
        "flights",
        "headers",
        "joiners",
        "keeping",
        "key",
        "limit",
        "size",
        "status",
        "streamed",
    )

    def __init__(self, key: str, limit: int, streamed: bool) -> None:
        self.key = key
        self.limit = limit
        self.streamed = streamed
        self.status: int | None = None
        self.headers: tuple[tuple[bytes, bytes], ...] = ()
        self.chunks: list[bytes] = []
        self.size = 0
        self.keeping = True  # still a candidate for the cache
        self.finished = False  # the client's answer ended properly (request.finish)
        self.closed = False
        self.joiners: list[Joiner] = []
        self.flights: dict[str, Capture] | None = None  # the table it is joinable in
        # Set when the leader's client left and the answer goes on for the joiners alone:
        # called when the last of them leaves too.
        self.deserted: Callable[[], None] | None = None

    # -- the request's side (relayd.http.site.RelayRequest) ---------------------------------

    def wrote(self, request: Any, data: bytes) -> None:
        """The relay wrote ``data`` to the client (the head goes with the first write)."""
        if self.status is None:
            self.status = request.code
            if self.status != 200:
                self._abandon()
                self._release(None, False)
                return
            self.headers = kept_headers(request.responseHeaders.getAllRawHeaders())
            if self.streamed:
                for joiner in list(self.joiners):
                    joiner.flight_started(self.status, self.headers)
        if self.status != 200:
            return
        if data is KEEPALIVE:
            # Joiners' clients sit through the same silence; the entry never holds it.
            if self.streamed:
                for joiner in list(self.joiners):
                    joiner.flight_data(data)
            return
        if self.keeping:
            self.size += len(data)
            if self.size > self.limit:
                self._abandon()
            else:
                self.chunks.append(data)
        if self.streamed:
            for joiner in list(self.joiners):
                joiner.flight_data(data)

    # -- joiners -----------------------------------------------------------------------------

    def join(self, joiner: Joiner) -> bool:
        """Add a joiner; False when it can no longer be given the whole answer."""
        if self.closed or not self.keeping:
            return False
        self.joiners.append(joiner)
        if self.streamed and self.status == 200:
            joiner.flight_started(self.status, self.headers)
            for chunk in self.chunks:
                joiner.flight_data(chunk)
        return True

    @property
    def waited_for(self) -> bool:
        """Whether requests still wait for this answer."""
        return bool(self.joiners) and not self.closed

    def leave(self, joiner: Joiner) -> None:
        if joiner in self.joiners:
            self.joiners.remove(joiner)
            deserted = self.deserted
            if not self.joiners and deserted is not None and not self.closed:
                self.deserted = None
                deserted()

    # -- the end -----------------------------------------------------------------------------

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def close(self, entry: CachedAnswer | None) -> None:
        """The leader is done: ``entry`` is its answer if the cache may keep it."""
        if self.closed:
            return
        self._abandon()
        self._release(entry, self.finished)

    def _abandon(self) -> None:
        """No longer a candidate for the cache, nor joinable."""
        self.keeping = False
        self.chunks = []
        flights = self.flights
        if flights is not None and flights.get(self.key) is self:
            del flights[self.key]
        self.flights = None

    def _release(self, entry: CachedAnswer | None, finished: bool) -> None:
        self.closed = True
        joiners, self.joiners = self.joiners, []
        for joiner in joiners:
            joiner.flight_ended(entry, finished)
