"""The twisted.web Site of a relay listener."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.server import Request, Site

from relayd.cache.flights import Capture
from relayd.http.body import BoundedBody
from relayd.http.channel import HalfClosingRelayChannel, RelayChannel
from relayd.http.connections import ConnectionTracker, Refused
from relayd.http.relay import RelayResource
from relayd.metrics import RelayMetrics
from relayd.runtime import RelayRuntime

_date: list[Any] = [-1, b""]  # the second and its Date value, made once per second


def http_date(now: float) -> bytes:
    """The ``Date`` header value for ``now`` (seconds since the epoch)."""
    second = int(now)
    if _date[0] != second:
        _date[0] = second
        _date[1] = datetimeToString(second)
    value: bytes = _date[1]
    return value


class RelayRequest(Request):
    """A twisted.web request handed straight to the relay resource.

    ``Request.process`` sets a ``Server`` header (relayd sends none), splits and unquotes
    the path into ``postpath`` and walks the resource tree; the relay resource is a leaf
    that serves every path and reads ``path`` itself, so none of that is needed.
    """

    #: Sees every byte written to the client (:class:`relayd.cache.flights.Capture`), set
    #: by the cache stage for an answer the cache may keep.
    tap: Capture | None = None

    def write(self, data: bytes) -> None:
        tap = self.tap
        if tap is not None:
            tap.wrote(self, data)
        Request.write(self, data)

    #: The client's connection is gone (:meth:`connectionLost` ran).
    lost = False

    def finish(self) -> None:
        tap = self.tap
        if tap is not None:
            tap.finished = True
            if self.lost:
                # An answer that went on for the requests waiting for it (the cache's
                # coalescing) after its own client left: nothing to finish here.
                return
        Request.finish(self)

    def connectionLost(self, reason: Failure) -> None:
        self.lost = True
        Request.connectionLost(self, reason)

    # Twisted drops a request's channel when its connection is lost; an answer that goes
    # on for the cache's waiters still registers, unregisters and drops its producer.

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.lost:
            self.producer = producer
            return
        Request.registerProducer(self, producer, streaming)

    def unregisterProducer(self) -> None:
        if self.lost:
            self.producer = None
            return
        Request.unregisterProducer(self)

    def loseConnection(self) -> None:
        if not self.lost:
            Request.loseConnection(self)

    def process(self) -> None:
        site = self.site = self.channel.site  # type: ignore[attr-defined]
        self.setHeader(b"date", http_date(site.reactor.seconds()))
        try:
            site.resource.render(self)
        except BaseException:
            self.processingFailed(Failure())


class RelaySite(Site):
    """Serves :class:`RelayResource`; bounds request bodies; leaves logging to the relay.

    ``clock`` must be the reactor itself in production (Site uses it for its channels'
    timeouts).

    Twisted's own combined-format access log is turned off: the relay writes one
    structured line per request itself.
    """

    noisy = False
    displayTracebacks = False

    def __init__(
        self,
        get_runtime: Callable[[], RelayRuntime],
        clock: IReactorTime,
        metrics: RelayMetrics | None = None,
        on_connections: Callable[[int], None] | None = None,
    ) -> None:
        # Bodies are JSON relayed as bytes: never parse them as HTML form submissions
        # (that costs a MIME parse of Content-Type on every POST).
        super().__init__(
            RelayResource(get_runtime, clock, metrics),
            requestFactory=RelayRequest,
            reactor=clock,
            parsePOSTFormSubmission=False,
        )
        self._get_runtime = get_runtime
        self.tracker = ConnectionTracker(
            clock, self.resource.metrics, lambda: get_runtime().config.connections,
            on_connections,
        )

    def buildProtocol(self, addr: Any) -> Any:
        """A channel for a new client connection, within the connection bounds and with
        the current configuration's deadlines."""
        if not self.tracker.admit(getattr(addr, "host", None)):
            return Refused()
        config = self._get_runtime().config
        kind = HalfClosingRelayChannel if config.half_close == "answer" else RelayChannel
        channel = kind(self.tracker, config.connections)
        channel.factory = self
        channel.site = self
        channel.requestFactory = self.requestFactory
        channel.callLater = self.reactor.callLater
        channel.timeOut = config.connections.idle_timeout
        return channel

    def getContentFile(self, length: int | None) -> Any:
        return BoundedBody(self._get_runtime().max_body_bytes)

    def log(self, request: Any) -> None:
        pass
