"""Persistent upstream connections of one backend: the pool its Agent takes connections from.

It does what :class:`twisted.web.client.HTTPConnectionPool` does for the Agent
(``getConnection(key, endpoint)``, ``persistent``, ``closeCachedConnections()``), with
the differences a relay needs:

* The most recently used idle connection is handed out first: the one least likely to
  have been closed by the upstream meanwhile. The others age out after ``idle_timeout``.
* A connection the upstream closes while it is idle leaves the pool at once, so the idle
  count is true and a dead connection is never handed out.
* **The keep-alive race.** An upstream may close an idle connection just as a request is
  sent on it; the request then fails before any byte of an answer arrived. Such a
  failure on a *reused* connection says nothing about the backend, so the request is
  sent once more on a fresh connection, whatever its method (relayd's request bodies are
  held in memory and can be sent again: see :class:`BytesProducer`). Twisted's own pool
  retries only idempotent requests without a body, and a POST is what relayd sends. A
  failure on the fresh connection is a real one and is reported as it is.
* Counters (connections opened, reused, requests retried on a fresh connection) and the
  idle count, read by the metrics without touching private attributes.

The client protocol is relayd's own (:mod:`relayd.client_protocol`, which also bounds an
answer's head); the failures it raises are twisted.web's. ``tests/unit/test_pool.py``
exercises the pool against the installed Twisted.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from relayd.client_protocol import (
    MAX_RESPONSE_HEAD,
    ClientProtocol,
    PreparedRequest,
    Request,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseHeadTooLargeError,
    ResponseNeverReceived,
)

__all__ = [
    "MAX_RESPONSE_HEAD",
    "BytesProducer",
    "ConnectionPool",
    "PoolSender",
    "ResponseHeadTooLargeError",
    "head_too_large",
]

# Failures that mean no byte of an answer was received (and for the first two, that the
# request was not even wholly sent).
_NOTHING_RECEIVED = (RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived)


@implementer(IBodyProducer)
class BytesProducer:
    """Sends a request body held in memory in one write, with a known length.

    ``FileBodyProducer`` would schedule a cooperator task per request; a body the relay
    already holds needs no such pacing. It can be sent again (``replayable``), so the
    pool may repeat a request on a fresh connection.
    """

    __slots__ = ("_body", "length")

    replayable = True

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def head_too_large(failure: Failure) -> bool:
    """Whether a request failed because the answer's head was too large."""
    if not failure.check(ResponseFailed):
        return False
    reasons: list[Failure] = getattr(failure.value, "reasons", [])
    return any(r.check(ResponseHeadTooLargeError) for r in reasons)


class _PooledProtocol(ClientProtocol):
    """The client protocol of one pooled connection: tells the pool when it goes idle
    (quiescent) and when its connection is lost."""

    def __init__(self, pool: ConnectionPool, key: Hashable) -> None:
        super().__init__(self._quiescent)
        self._pool = pool
        self._key = key

    def _quiescent(self, protocol: ClientProtocol) -> None:
        self._pool._put(self._key, self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self._pool._lost(self._key, self)


class _ConnectionFactory(Factory):
    """Builds the protocol of one new pooled connection; silent (no log per connection)."""

    noisy = False

    def __init__(self, pool: ConnectionPool, key: Hashable) -> None:
        self._pool = pool
        self._key = key

    def buildProtocol(self, addr: Any) -> _PooledProtocol:
        return _PooledProtocol(self._pool, self._key)


class _ReusedConnection:
    """An idle connection taken from the pool for one request, with the one retry of the
    keep-alive race on a fresh connection."""

    __slots__ = ("_connection", "_endpoint", "_key", "_pool")

    def __init__(
        self,
        pool: ConnectionPool,
        connection: _PooledProtocol,
        key: Hashable,
        endpoint: IStreamClientEndpoint,
    ) -> None:
        self._pool = pool
        self._connection = connection
        self._key = key
        self._endpoint = endpoint

    @property
    def state(self) -> str:
        state: str = self._connection.state
        return state

    def request(self, request: Request) -> Deferred[IResponse]:
        d = self._connection.request(request)

        def failed(failure: Failure) -> Any:
            if not _race_lost(failure, request):
                return failure
            self._pool.stale_retries += 1
            fresh: Deferred[Any] = self._pool._connect(self._key, self._endpoint)
            return fresh.addCallback(lambda connection: connection.request(request))

        # Cancelling ``d`` while it waits for the fresh connection or its answer cancels
        # that (Deferred.cancel follows a chained Deferred).
        return d.addErrback(failed)


def _race_lost(failure: Failure, request: Request) -> bool:
    """Whether a request failed on a reused connection in the keep-alive race: nothing
    of an answer arrived, the caller did not cancel, and the body can be sent again."""
    if not failure.check(*_NOTHING_RECEIVED):
        return False
    for reason in getattr(failure.value, "reasons", ()):
        if reason.check(CancelledError):
            return False
    producer = request.bodyProducer
    return producer is None or getattr(producer, "replayable", False)


class ConnectionPool:
    """Idle keep-alive connections per key (scheme, host, port), for one backend's Agent.

    At most ``max_idle`` idle connections are kept per key (the oldest is closed beyond
    that); each is closed after ``idle_timeout`` seconds unused. Keep ``idle_timeout``
    below the upstream's own keep-alive timeout.
    """

    persistent = True  # read by Agent: requests ask for keep-alive

    def __init__(self, clock: IReactorTime, max_idle: int, idle_timeout: float) -> None:
        self._clock = clock
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._idle: dict[Hashable, list[_PooledProtocol]] = {}
        self._expiry: dict[_PooledProtocol, IDelayedCall] = {}
        self.opened = 0  # connections attempted
        self.reused = 0  # requests sent on an idle connection
        self.stale_retries = 0  # requests sent again on a fresh connection (the race)

    def getConnection(self, key: Hashable, endpoint: IStreamClientEndpoint) -> Deferred[Any]:
        """A connection for one request: the most recently idle one, or a new one."""
        reused = self.take_idle(key, endpoint)
        if reused is not None:
            return succeed(reused)
        return self._connect(key, endpoint)

    def take_idle(self, key: Hashable, endpoint: IStreamClientEndpoint) -> _ReusedConnection | None:
        """The most recently idle connection, taken out of the pool; None if none is."""
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            self._expiry.pop(connection).cancel()
            if connection.state == "QUIESCENT":
                self.reused += 1
                return _ReusedConnection(self, connection, key, endpoint)
        return None

    def idle_connections(self) -> int:
        """Idle connections held now."""
        return sum(len(idle) for idle in self._idle.values())

    def closeCachedConnections(self) -> Deferred[None]:
        """Close every idle connection; fires once they are closed."""
        closing = [connection.abort() for idle in self._idle.values() for connection in idle]
        self._idle = {}
        expiry, self._expiry = self._expiry, {}
        for timer in expiry.values():
            timer.cancel()
        return gatherResults(closing).addCallback(lambda _: None)

    # -- called by the pooled protocols ---------------------------------------------------

    def _connect(self, key: Hashable, endpoint: IStreamClientEndpoint) -> Deferred[Any]:
        self.opened += 1
        connected: Deferred[Any] = endpoint.connect(_ConnectionFactory(self, key))
        return connected

    def _put(self, key: Hashable, connection: _PooledProtocol) -> None:
        """A connection finished its request and may carry the next one."""
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self.max_idle:
            oldest = idle.pop(0)
            self._expiry.pop(oldest).cancel()
            oldest.abort()
        idle.append(connection)
        self._expiry[connection] = self._clock.callLater(
            self.idle_timeout, self._expire, key, connection
        )

    def _expire(self, key: Hashable, connection: _PooledProtocol) -> None:
        del self._expiry[connection]
        self._idle[key].remove(connection)
        connection.abort()

    def _lost(self, key: Hashable, connection: _PooledProtocol) -> None:
        """A connection closed; if it was idle, it leaves the pool now."""
        timer = self._expiry.pop(connection, None)
        if timer is not None:
            timer.cancel()
            self._idle[key].remove(connection)


# A request target relayd sends: visible ASCII only (what Agent would accept too).
_TARGET = re.compile(rb"[\x21-\x7e]+")


class PoolSender:
    """Sends requests of one backend on its pool, without an Agent in between.

    Agent parses the URL, looks the endpoint up and builds a ``Headers`` for every
    request; for a backend they never change, so the pool key, the endpoint, the path
    prefix and the ``Host`` line are found once. A request is serialized here in one
    piece (:class:`~relayd.client_protocol.PreparedRequest`), with the same framing
    Agent gives it (``Content-Length`` when there is a body or the method is POST).
    """

    __slots__ = ("_endpoint", "_host_line", "_key", "_pool", "_prefix")

    def __init__(self, pool: ConnectionPool, endpoint: IStreamClientEndpoint, scheme: bytes,
                 host: bytes, port: int, prefix: bytes) -> None:
        self._pool = pool
        self._endpoint = endpoint
        self._key = (scheme, host, port)  # the key Agent uses: probes share the connections
        self._prefix = prefix
        if b":" in host:  # an IPv6 literal
            host = b"[" + host + b"]"
        default = (scheme, port) in ((b"http", 80), (b"https", 443))
        self._host_line = b"Host: " + (host if default else b"%b:%d" % (host, port)) + b"\r\n"

    def send(
        self,
        method: bytes,
        path: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes | None,
    ) -> Deferred[IResponse]:
        """Send ``method`` ``path`` (below the backend's prefix) with ``headers``."""
        target = self._prefix + path
        if _TARGET.fullmatch(target) is None:
            raise ValueError(f"invalid request target {target[:200]!r}")
        lines = [b"%b %b HTTP/1.1\r\n" % (method, target), self._host_line]
        for name, value in headers:
            if b"\r" in value or b"\n" in value:
                value = value.replace(b"\r", b" ").replace(b"\n", b" ")
            lines.append(b"%b: %b\r\n" % (name, value))
        if body or method == b"POST":
            lines.append(b"Content-Length: %d\r\n\r\n" % len(body or b""))
            if body:
                lines.append(body)
        else:
            lines.append(b"\r\n")
        request = PreparedRequest(method, target, b"".join(lines))
        reused = self._pool.take_idle(self._key, self._endpoint)
        if reused is not None:
            return reused.request(request)  # (no Deferred for the connection itself)
        d = self._pool._connect(self._key, self._endpoint)
        return d.addCallback(_send_on, request)


def _send_on(connection: Any, request: PreparedRequest) -> Deferred[IResponse]:
    sent: Deferred[IResponse] = connection.request(request)
    return sent
